"""Running a captioner from the tab: under A1111's queue lock, with its progress bar and Interrupt.

The model is built by the CLI's own ``build_captioner`` (one place decides what "both" means and
which defaults apply); A1111's interrogators come from ``lorakit_ext.webui.captioners``, which
also moves the loaded checkpoint to RAM while any captioner runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from lorakit_ext.caption.blip import DEFAULT_BLIP_MODEL, DEFAULT_MAX_LENGTH, DEFAULT_MIN_LENGTH
from lorakit_ext.caption.runner import MODES
from lorakit_ext.caption.wd import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, DEFAULT_WD_MODEL
from lorakit_ext.dataset.captions import read_caption
from lorakit_ext.errors import UserError
from lorakit_ext.train.events import Interrupted, Progress
from lorakit_ext.webui import ui_shared, ui_tables
from lorakit_ext.webui.ui_inputs import CAPTIONERS, captioner_options

WRITTEN_HEADERS = ("image", "caption written")
MODE_HELP = "missing: only images without a caption · overwrite: replace · prepend/append: add the tags a caption lacks"


def build_captioner(choice: str, options: dict):
    from lorakit_ext.webui import captioners

    kind = CAPTIONERS.get(choice)
    if kind is None:
        raise UserError(f"unknown captioner {choice!r}; pick one from the list")
    if kind.startswith("A1111"):
        return getattr(captioners, kind)()
    from lorakit_ext.cli.caption import build_captioner as build

    return build(SimpleNamespace(captioner=kind, **options))


def mirror_progress(state):
    """Captioning progress as one A1111 job whose sampling steps are the images."""

    def show(p: Progress) -> None:
        state.job_count = 1
        state.sampling_steps = max(1, p.total_steps)
        state.sampling_step = p.step
        state.textinfo = p.message

    return show


def run(id_task, project_name, choice, mode, batch_size, *options):
    from modules import shared

    from lorakit_ext.webui.captioners import caption_project_in_webui

    project = ui_shared.current_project(project_name)
    captioner = build_captioner(choice, captioner_options(choice, *options))
    try:
        report = caption_project_in_webui(
            project,
            captioner,
            mode=mode,
            batch_size=int(batch_size),
            on_progress=mirror_progress(shared.state),
            should_stop=lambda: shared.state.interrupted,
        )
    except Interrupted as exc:
        return gr.update(), ui_shared.ok(f"Stopped: {exc}")
    written = [[name, read_caption(project.dataset_file(name)).text] for name in report.written]
    return ui_tables.table(WRITTEN_HEADERS, written), ui_shared.ok(report.text())


def build(project):
    """The captioner section; returns its run event so the caller can refresh the captions."""
    from modules.ui_components import FormRow

    from lorakit_ext.webui.settings import setting

    task = ui_shared.task_id_box()
    default = setting("lorakit_default_captioner")
    with FormRow():
        choice = gr.Dropdown(
            label="Captioner",
            choices=list(CAPTIONERS),
            value=default if default in CAPTIONERS else next(iter(CAPTIONERS)),
            elem_id="lorakit_captioner",
        )
        mode = gr.Radio(label="Mode", choices=list(MODES), value="missing", info=MODE_HELP, elem_id="lorakit_caption_mode")
        batch_size = gr.Slider(
            label="Images per batch",
            minimum=1,
            maximum=64,
            step=1,
            value=8,
            elem_id="lorakit_caption_batch",
            info="halved once if the GPU runs out of memory",
        )
    with gr.Accordion("Captioner options", open=False):
        with FormRow():
            blip_model = gr.Textbox(
                label="BLIP model",
                value=DEFAULT_BLIP_MODEL,
                info="Hugging Face id or a folder on the server",
                elem_id="lorakit_blip_model",
            )
            prefix = gr.Textbox(
                label="BLIP prefix",
                placeholder="a photograph of",
                info="steers the sentence; not written",
                elem_id="lorakit_blip_prefix",
            )
            beams = gr.Slider(label="Beams", minimum=1, maximum=8, step=1, value=1, elem_id="lorakit_blip_beams")
            min_length = gr.Slider(
                label="Min tokens", minimum=1, maximum=75, step=1, value=DEFAULT_MIN_LENGTH, elem_id="lorakit_blip_min"
            )
            max_length = gr.Slider(
                label="Max tokens", minimum=1, maximum=150, step=1, value=DEFAULT_MAX_LENGTH, elem_id="lorakit_blip_max"
            )
        with FormRow():
            wd_model = gr.Textbox(
                label="WD tagger",
                value=DEFAULT_WD_MODEL,
                info="a WD v3 tagger: Hugging Face id or folder",
                elem_id="lorakit_wd_model",
            )
            threshold = gr.Slider(
                label="Tag threshold",
                minimum=0.05,
                maximum=0.95,
                step=0.01,
                value=DEFAULT_GENERAL_THRESHOLD,
                elem_id="lorakit_wd_threshold",
                info="0.25–0.35 suits most datasets",
            )
            character_threshold = gr.Slider(
                label="Character threshold",
                minimum=0.05,
                maximum=1.0,
                step=0.01,
                value=DEFAULT_CHARACTER_THRESHOLD,
                elem_id="lorakit_wd_character_threshold",
            )
            blacklist = gr.Textbox(
                label="Never write these tags", placeholder="simple background, white background", elem_id="lorakit_wd_blacklist"
            )
            ratings = gr.Checkbox(label="Add the rating tag", value=False, elem_id="lorakit_wd_ratings")
    with gr.Row():
        start = gr.Button("Caption images", variant="primary", elem_id="lorakit_caption_start")
        stop = gr.Button("Interrupt", elem_id="lorakit_caption_interrupt")
    message = ui_shared.job_message("lorakit_caption_progress")
    written = gr.Dataframe(headers=list(WRITTEN_HEADERS), interactive=False, wrap=True, elem_id="lorakit_caption_written")
    inputs = [
        task,
        project,
        choice,
        mode,
        batch_size,
        blip_model,
        prefix,
        beams,
        min_length,
        max_length,
        wd_model,
        threshold,
        character_threshold,
        blacklist,
        ratings,
    ]
    stop.click(ui_shared.interrupt_a1111, inputs=[], outputs=[])
    return ui_shared.job_button(start, run, inputs, [written, message], "lorakit_run_captioner")

"""The Train form's "Generate regularisation images", below "Regularisation folders": A1111's own
txt2img on the loaded model draws them from the dataset's captions without the activation tag into
``<project>/reg/`` (:mod:`lorakit_ext.dataset.reg_images`), as an A1111 job with its progress bar
and Interrupt and with the project's lock held; "Regularisation folders" then names the folder.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from lorakit_ext.dataset.reg_images import dataset_reg_prompts, prompts_note, with_reg_line, write_reg_images
from lorakit_ext.project_lock import ProjectLock
from lorakit_ext.webui import ui_shared

# The form fields the drawing reads; the last one it also fills.
FORM_FIELDS = ("trigger", "seed", "resolution", "reg_folders")
DEFAULT_STEPS = 20


def mirror_progress(state):
    """The images as A1111 jobs: txt2img counts each one's steps and moves ``job_no`` on after it."""

    def show(done: int, total: int, path) -> None:
        state.job_count, state.job_no = total, done
        state.textinfo = f"regularisation image {min(done + 1, total)}/{total}"

    return show


def generate(id_task, project_name, count, steps, trigger, seed, resolution, reg_folders):
    """Draws the images; returns (gallery items, the Regularisation folders text, message)."""
    from modules import shared

    from lorakit_ext.webui.samples import a1111_render

    project = ui_shared.current_project(project_name)
    prompts = dataset_reg_prompts(project, trigger)
    side = int(resolution)
    with ProjectLock(project.path, "drawing regularisation images (the tab)"):
        report = write_reg_images(
            project, prompts, a1111_render(side, side, int(steps)), seed=int(seed), count=int(count or 0) or None,
            on_progress=mirror_progress(shared.state), should_stop=lambda: shared.state.interrupted,
        )
    lines = [report.text(), prompts_note(trigger)]
    folders = reg_folders
    if report.written:
        folders = with_reg_line(reg_folders, project)
        lines.append("Regularisation folders names them." if folders == reg_folders
                     else "Added them to Regularisation folders; they train with the next run.")
    gallery = [(str(path), path.stem) for path in report.written]
    return gallery, folders, ui_shared.ok("\n".join(lines))


def _interrupt() -> None:
    from modules import shared

    shared.state.interrupt()


def build():
    """The controls, made where they should appear (inside the form's Dataset group); :func:`wire`
    connects them once every form field exists."""
    from modules.ui_components import FormRow

    with gr.Accordion("Generate regularisation images", open=False, elem_id="lorakit_reg"):
        task = ui_shared.task_id_box()
        with FormRow():
            count = gr.Number(label="Images to draw", value=0, precision=0, elem_id="lorakit_reg_count",
                              info="0: one per dataset image; numbering continues after reg/'s files, none is replaced")
            steps = gr.Slider(label="Steps per image", minimum=1, maximum=150, step=1, value=DEFAULT_STEPS,
                              elem_id="lorakit_reg_steps")
        with FormRow():
            start = gr.Button("Generate regularisation images", elem_id="lorakit_reg_start")
            stop = gr.Button("Interrupt", elem_id="lorakit_reg_interrupt")
        message = ui_shared.job_message("lorakit_reg_progress")
        gallery = gr.Gallery(label="Regularisation images", columns=6, elem_id="lorakit_reg_gallery")
    return SimpleNamespace(task=task, count=count, steps=steps, start=start, stop=stop, message=message, gallery=gallery)


def wire(controls, project, fields: dict):
    """Start and Interrupt; returns Start's event."""
    controls.stop.click(_interrupt, inputs=[], outputs=[])
    inputs = [controls.task, project, controls.count, controls.steps, *(fields[name] for name in FORM_FIELDS)]
    outputs = [controls.gallery, fields["reg_folders"], controls.message]
    return ui_shared.job_button(controls.start, generate, inputs, outputs, "lorakit_generate_reg_images")

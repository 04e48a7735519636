"""The Compare sub-tab: pick a run, draw its epochs × seeds grid, promote the best epoch, or hand
the same grid to txt2img's own X/Y/Z plot.

Runs come from the project's ``runs/*/run.json`` records, so the tab works after a restart.
txt2img is filled the way A1111's "Send to txt2img" buttons do it: an infotext with the
script's own fields ("Script: X/Y/Z plot, X Type: …, X Values: …") goes through
``infotext_utils``' paste bindings, which set the prompt, the script dropdown and the axis
fields by component. No element of txt2img is touched from JS, so it survives DOM changes.
"""

from __future__ import annotations

import gradio as gr

from lorakit_ext.errors import UserError
from lorakit_ext.webui import suggestion, ui_results, ui_shared
from lorakit_ext.webui.limits import GRID_CFG, GRID_SIZE, GRID_STEPS, PREFERRED_WEIGHT
from lorakit_ext.webui.settings import parse_seeds, setting

REFRESH_SYMBOL = "\U0001f504"  # 🔄, A1111's refresh tool button


def _runs(project_name) -> list[dict]:
    return ui_results.read_runs(ui_shared.current_project(project_name)) if project_name else []


def _epoch_names(run: dict) -> list[str]:
    return [f.stem for f in run["epochs"]]


def _prompt(run: dict) -> str:
    from lorakit_ext.webui.jobs import grid_prompt

    names = _epoch_names(run) or [f"{run['output_name']}-01"]
    return grid_prompt(setting("lorakit_test_prompt"), run["trigger"] or run["output_name"], run["output_name"], names[0])


def _run_dir(project_name, run: dict):
    return ui_shared.current_project(project_name).runs / run["id"]


def _promote_choice(names: list[str], report: dict):
    """The Promote dropdown, set to the suggested epoch (the last one without a suggestion)."""
    label = report["suggestion"]["label"]
    return gr.update(choices=names, value=label if label in names else (names[-1] if names else None))


def _select(project_name, choice=None):
    """Run ``choice`` (None: the newest, as after a project change or a training): its epochs,
    the test prompt, its trigger and its epoch report with the suggested epoch."""
    runs = _runs(project_name)
    if not runs:
        empty = gr.update(choices=[], value=None)
        return gr.update(choices=[], value=None), empty, empty, "", "", ui_shared.ok("No training runs in this project yet."), ""
    run = next((r for r in runs if ui_results.run_choice(r) == choice), runs[0])
    names = _epoch_names(run)
    info = f"{run['output_name']}: {len(names)} epoch files in {run.get('output_dir', '?')}; run {run.get('status', '?')}."
    report = suggestion.saved_report(_run_dir(project_name, run))
    return (
        gr.update(choices=[ui_results.run_choice(r) for r in runs], value=ui_results.run_choice(run)),
        gr.update(choices=names, value=names),
        _promote_choice(names, report),
        _prompt(run),
        run["trigger"],
        ui_shared.ok(info),
        suggestion.report_text(report),
    )


def _grid_args(names, seeds_text, weights_text):
    if not names:
        raise UserError("choose at least one epoch for the grid")
    weights = ui_results.parse_numbers(weights_text, float, "LoRA weights", "0.5, 1") or None
    return list(names), parse_seeds(seeds_text), weights


def _grid(id_task, project_name, choice, names, prompt, negative, seeds_text, weights_text, baseline, steps, size, cfg):
    from lorakit_ext.webui import xyz

    run = ui_results.find_run(_runs(project_name), choice)
    names, seeds, weights = _grid_args(names, seeds_text, weights_text)
    result = xyz.run_epoch_grid(
        names,
        prompt=prompt,
        negative=negative,
        seeds=seeds,
        weights=weights,
        baseline=baseline,
        steps=int(steps),
        width=int(size),
        height=int(size),
        cfg_scale=float(cfg),
    )
    report = suggestion.measured_report(ui_shared.current_project(project_name), _run_dir(project_name, run), result.cells)
    label = report["suggestion"]["label"]
    caption = f"epoch grid — suggested: {label}" if label else "epoch grid — no epoch suggested"
    return ([(result.image, caption)], result, suggestion.report_text(report), _promote_choice(_epoch_names(run), report),
            ui_shared.ok(f"Grid saved as {result.path}."))


def _promote(project_name, choice, epoch, weight, description, trigger, remove_others, grid):
    import safetensors

    from lorakit_ext.compare.promote import promote
    from lorakit_ext.export.card import sd_version_of
    from lorakit_ext.webui import host

    project = ui_shared.current_project(project_name)
    run = ui_results.find_run(_runs(project_name), choice)
    chosen = next((f for f in run["epochs"] if f.stem == epoch), None)
    if chosen is None:
        raise UserError("choose the epoch to promote")
    with safetensors.safe_open(str(chosen), framework="pt") as fh:
        sd_version = sd_version_of(dict(fh.metadata() or {}))
    preview = ui_results.cell_for(grid.cells, epoch, float(weight)) if grid is not None else None
    result = promote(
        project,
        host.lora_dir(),
        chosen,
        trigger=trigger,
        preferred_weight=float(weight),
        description=description,
        sd_version=sd_version,
        preview=preview,
        remove_other_epochs=remove_others,
        run_files=run["epochs"],
    )
    host.refresh_loras()
    written = [result.path, result.card_path] + ([result.preview_path] if result.preview_path else [])
    lines = [f"Promoted {chosen.name} as {result.path.name}:", *map(str, written)]
    if result.removed_batch:
        lines.append(f"The other epochs went to {result.removed_batch.folder} (Dataset tab: Undo brings them back).")
    return "<br>".join(map(ui_shared.ok, lines))


def fill_infotext(names, prompt, negative, seeds_text, weights_text, baseline, steps, size, cfg) -> str:
    """The infotext whose paste sets txt2img up for the same grid (``xyz.xyz_fill_values``)."""
    from modules.infotext_utils import quote

    from lorakit_ext.webui import xyz

    names, seeds, weights = _grid_args(names, seeds_text, weights_text)
    values = xyz.xyz_fill_values(names, seeds, weights, baseline=baseline, prompt=prompt, negative=negative)
    params = {
        "Steps": int(steps),
        "CFG scale": cfg,
        "Seed": seeds[0],
        "Size": f"{int(size)}x{int(size)}",
        "Script": values["script"],
        "X Type": values["x_type"],
        "X Values": values["x_values"],
        "Y Type": values["y_type"],
        "Y Values": values["y_values"],
        "Z Type": values["z_type"],
    }
    if values["z_values"]:
        params["Z Values"] = values["z_values"]
    lines = [
        values["prompt"],
        f"Negative prompt: {negative}" if negative else None,
        ", ".join(f"{k}: {quote(v)}" for k, v in params.items()),
    ]
    return "\n".join(line for line in lines if line is not None)


def _fill(*grid_inputs):
    """The infotext and a message; an empty infotext on failure, so the JS step pastes nothing (an
    empty paste would bring back A1111's last generation parameters instead)."""
    try:
        return fill_infotext(*grid_inputs), ui_shared.ok("txt2img's X/Y/Z plot is set up for this grid: press Generate there.")
    except UserError as exc:
        return "", ui_shared.error(str(exc))


def build(project):
    """The sub-tab; returns the refresh spec for a page load or a finished training, and the
    Promote event (it can move epoch files into the project's ``_removed/``)."""
    from modules import infotext_utils
    from modules.ui_components import FormRow, ToolButton

    size = int(setting("lorakit_grid_size"))
    task = ui_shared.task_id_box()
    grid_state = gr.State(None)
    with FormRow():
        run = gr.Dropdown(label="Training run", choices=[], elem_id="lorakit_compare_run")
        reload = ToolButton(REFRESH_SYMBOL, elem_id="lorakit_compare_run_refresh", tooltip="re-read the project's runs")
    info = ui_shared.message("lorakit_compare_info")
    with gr.Row():
        with gr.Column(scale=2):
            epochs = gr.Dropdown(label="Epochs in the grid", choices=[], multiselect=True, elem_id="lorakit_compare_epochs")
            prompt = gr.Textbox(
                label="Test prompt",
                lines=2,
                elem_id="lorakit_compare_prompt",
                info="the <lora:…> tag names the first epoch; the X axis swaps it",
            )
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="lorakit_compare_negative")
            with FormRow():
                seeds = gr.Textbox(label="Seeds", value=setting("lorakit_grid_seeds"), elem_id="lorakit_compare_seeds")
                weights = gr.Textbox(label="LoRA weights", placeholder="1 (e.g. 0.6, 0.8, 1)", elem_id="lorakit_compare_weights")
                baseline = gr.Checkbox(label="No-LoRA column", value=True, elem_id="lorakit_compare_baseline")
            with FormRow():
                steps = gr.Slider(
                    label="Sampling steps",
                    value=int(setting("lorakit_grid_steps")),
                    elem_id="lorakit_compare_steps",
                    **GRID_STEPS.slider(),
                )
                grid_size = gr.Slider(label="Grid image size", value=size, elem_id="lorakit_compare_size", **GRID_SIZE.slider())
                cfg = gr.Slider(label="CFG scale", value=7.0, elem_id="lorakit_compare_cfg", **GRID_CFG.slider())
            with gr.Row():
                draw = gr.Button("Make grid", variant="primary", elem_id="lorakit_grid_start")
                fill = gr.Button("Fill txt2img X/Y/Z", elem_id="lorakit_fill_xyz")
            grid_message = ui_shared.job_message("lorakit_grid_progress")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Grid", columns=1, elem_id="lorakit_grid_gallery")
    report = gr.Textbox(
        label="Epochs and the suggested one", lines=6, interactive=False, elem_id="lorakit_compare_report",
        info="validation loss per epoch; a grid with the no-LoRA column also measures each epoch's effect, its "
             "likeness to the training images, and flags epochs with no visible effect or overcooked ones",
    )
    with gr.Accordion("Promote the best epoch", open=True):
        with FormRow():
            epoch = gr.Dropdown(label="Epoch to promote", choices=[], elem_id="lorakit_promote_epoch")
            weight = gr.Slider(
                label="Preferred weight", value=1.0, elem_id="lorakit_promote_weight", **PREFERRED_WEIGHT.slider()
            )
            trigger = gr.Textbox(
                label="Activation text", elem_id="lorakit_promote_trigger", info="A1111 adds it to the prompt with the LoRA"
            )
        description = gr.Textbox(label="Description", lines=2, elem_id="lorakit_promote_description")
        remove_others = gr.Checkbox(
            label="Delete the other epochs of this run (moved to _removed/, undo restores them)",
            value=False,
            elem_id="lorakit_promote_remove",
        )
        promote_button = gr.Button("Promote", variant="primary", elem_id="lorakit_promote")
        promoted = ui_shared.message("lorakit_promote_result")
    infotext = gr.Textbox(visible=False, elem_id="lorakit_xyz_infotext")
    send = gr.Button(visible=False, elem_id="lorakit_xyz_send")

    selected = [run, epochs, epoch, prompt, trigger, info, report]
    refresh = dict(fn=ui_shared.guarded(len(selected))(_select), inputs=[project], outputs=selected, show_progress="hidden")
    project.change(**refresh)
    reload.click(**refresh)
    reselect = dict(fn=ui_shared.guarded(len(selected))(_select), inputs=[project, run], outputs=selected, show_progress="hidden")
    run.input(**reselect)
    grid_inputs = [epochs, prompt, negative, seeds, weights, baseline, steps, grid_size, cfg]
    ui_shared.job_button(draw, _grid, [task, project, run, *grid_inputs], [gallery, grid_state, report, epoch, grid_message],
                         "lorakit_render_grid")
    promoted_event = promote_button.click(
        ui_shared.guarded(1)(_promote),
        inputs=[project, run, epoch, weight, description, trigger, remove_others, grid_state],
        outputs=[promoted],
    )
    promoted_event.then(**reselect)
    # The paste binding reads the infotext when `send` is pressed, so it is written first, then pressed.
    fill.click(_fill, inputs=grid_inputs, outputs=[infotext, grid_message]).then(
        None, inputs=[infotext], **ui_shared.js("lorakit_send_xyz")
    )
    infotext_utils.register_paste_params_button(
        infotext_utils.ParamBinding(paste_button=send, tabname="txt2img", source_text_component=infotext)
    )
    return refresh, promoted_event

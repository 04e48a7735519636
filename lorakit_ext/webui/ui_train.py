"""The Train sub-tab: the form generated from ``TrainConfig``, presets, the plan, Start/Interrupt,
and the run's loss curve, epoch files and samples; regularisation images are drawn from the form
(``ui_reg_images``).

Start runs ``jobs.train_in_gradio`` under ``wrap_gradio_gpu_call``; the button's JS gives it a
task id and A1111's ``requestProgress`` draws the progress bar. While it runs, the same JS presses
"Show progress" every few seconds so the loss curve and the files grow during the run.
"""

from __future__ import annotations

import json

import gradio as gr

from lorakit_ext.errors import UserError
from lorakit_ext.models.families import PRESETS, family_of_preset, first_preset, known_family
from lorakit_ext.webui import ui_form, ui_plan, ui_reg_images, ui_results, ui_shared, ui_tables

SPECS = ui_form.form_specs()


def component(spec: ui_form.FieldSpec):
    common = dict(label=spec.label, info=spec.info, value=ui_form.widget_value(spec, spec.default), elem_id=spec.elem_id)
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)
    if spec.kind == "number":
        return gr.Number(precision=spec.precision, **common)
    return gr.Textbox(lines=spec.lines, **common)


def _follow_loaded_model(form_family, *current):
    """When the checkpoint in memory is of another family than the form's settings (the user
    loaded an SDXL model), the form takes that family's first preset: SD1.5's 512² settings would
    train an SDXL LoRA badly. The Output fields stay; nothing changes while the family is the same,
    so the user's own edits survive every page load."""
    from lorakit_ext.webui.host import model_in_memory

    family = known_family(model_in_memory())
    if family is None or family.name == form_family:
        return [gr.update()] * (2 + len(current))
    label = first_preset(family)
    return [family.name, label, *ui_form.preset_values(SPECS, label, current)]


def _choose_preset(label, *current):
    return [family_of_preset(label).name, *ui_form.preset_values(SPECS, label, current)]


def loss_plot(points, validation=()):
    columns = ui_results.loss_columns(points, validation)
    if columns is None:
        return None
    import pandas as pd

    return pd.DataFrame(columns)


def files_table(files) -> dict:
    return ui_tables.table(ui_results.FILE_HEADERS, ui_results.file_rows(files))


def _plan(project_name, *values) -> str:
    """The plan box's text; a value that does not fit is a line of it (the box is plain text)."""
    if not project_name:
        return "Choose a project to see the plan."
    try:
        config = ui_form.config_from_values(SPECS, values)
        dataset = ui_shared.current_project(project_name).dataset
        sizes = ui_plan.dataset_sizes(dataset)
    except UserError as exc:
        return f"Problem: {exc}"
    return ui_plan.plan_text(config, sizes, dataset)


def _start(id_task, project_name, *values):
    from lorakit_ext.webui import jobs

    ui_shared.current_project(project_name)
    config = ui_form.config_from_values(SPECS, values)
    losses, files, grid, status = jobs.train_in_gradio(id_task, project_name, json.dumps(config.to_dict()))
    data = jobs.job_status(id_task)
    return loss_plot(losses, data["validation"]), files_table(files), ui_results.sample_items(data["samples"], grid), status


def _resume(id_task, project_name, run_id):
    from lorakit_ext.webui import jobs

    ui_shared.current_project(project_name)
    if not run_id:
        raise UserError("choose an interrupted run to resume (runs that finished or never saved a state are not listed)")
    losses, files, grid, status = jobs.train_in_gradio(id_task, project_name, json.dumps({jobs.RESUME_KEY: run_id}))
    data = jobs.job_status(id_task)
    return loss_plot(losses, data["validation"]), files_table(files), ui_results.sample_items(data["samples"], grid), status


def resumable_runs(project_name):
    """The project's runs a resume can continue, newest first, for the Resume dropdown."""
    from lorakit_ext.train.record import list_runs

    if not project_name:
        return gr.update(choices=[], value=None)
    try:
        runs = [r["run"] for r in list_runs(ui_shared.current_project(project_name)) if r["resumable"]]
    except UserError:
        runs = []
    return gr.update(choices=runs, value=runs[0] if runs else None)


def _show(task_id):
    """The job ``task_id`` (or the latest one) as the run's outputs; also after a page reload."""
    from lorakit_ext.webui import jobs

    data = jobs.job_status(task_id or None)
    return (
        loss_plot(data["losses"], data["validation"]),
        files_table(data["files"]),
        ui_results.sample_items(data["samples"], data["grid"]),
        jobs.status_html(data),
    )


def _interrupt(task_id):
    from lorakit_ext.webui import jobs

    stopped = jobs.interrupt(task_id or None)
    return ui_shared.ok(
        "Stopping before the next step; what was trained so far is saved." if stopped else "No training is running."
    )


def build(project):
    """The sub-tab; returns (the Start event, the plan refresh spec, the spec that sets the form
    for the loaded model's family)."""
    from modules.ui_components import FormRow

    task = ui_shared.task_id_box()
    # The family whose defaults the form holds: TrainConfig's own defaults are SD1.5's.
    form_family = gr.State(family_of_preset(ui_form.DEFAULT_PRESET).name)
    with gr.Row():
        with gr.Column(scale=3, elem_id="lorakit_train_form"):
            preset = gr.Dropdown(
                label="Preset",
                choices=list(PRESETS),
                value=ui_form.DEFAULT_PRESET,
                elem_id="lorakit_train_preset",
                info="sets every training option (name, trigger and comment stay)",
            )
            fields = {}
            for group, specs in ui_form.grouped(SPECS).items():
                with gr.Accordion(group, open=group in ui_form.OPEN_GROUPS, elem_id=f"lorakit_train_group_{group.lower()}"):
                    for spec in specs:
                        fields[spec.name] = component(spec)
                        if spec.name == "reg_folders":
                            reg_controls = ui_reg_images.build()
        with gr.Column(scale=2, elem_id="lorakit_train_side"):
            plan = gr.Textbox(label="Plan", lines=8, interactive=False, elem_id="lorakit_train_plan")
            with FormRow():
                start = gr.Button("Start training", variant="primary", elem_id="lorakit_train_start")
                stop = gr.Button("Interrupt", elem_id="lorakit_train_interrupt")
                show = gr.Button("Show progress", elem_id="lorakit_train_poll")
            with FormRow():
                resume_run = gr.Dropdown(label="Interrupted run", choices=[], elem_id="lorakit_train_resume_run",
                                         info="continues with the settings, dataset and model it started with")
                resume = gr.Button("Resume", elem_id="lorakit_train_resume")
            status = ui_shared.job_message("lorakit_train_progress")
            chart = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                label="Loss",
                title="Training loss per step, validation loss per epoch",
                tooltip=["series", "step", "loss"],
                height=240,
                elem_id="lorakit_train_loss",
            )
            files = gr.Dataframe(headers=list(ui_results.FILE_HEADERS), interactive=False, elem_id="lorakit_train_files")
            samples = gr.Gallery(label="Samples", columns=4, elem_id="lorakit_train_samples")

    values = [fields[spec.name] for spec in SPECS]
    planned = dict(fn=_plan, inputs=[project, *values], outputs=[plan], show_progress="hidden")
    ui_reg_images.wire(reg_controls, project, fields).then(**planned)
    for name in ui_plan.PLAN_FIELDS:
        fields[name].input(**planned)
    project.change(**planned)
    project.change(resumable_runs, inputs=[project], outputs=[resume_run], show_progress="hidden")
    preset.input(_choose_preset, inputs=[preset, *values], outputs=[form_family, *values]).then(**planned)
    follow = dict(fn=_follow_loaded_model, inputs=[form_family, *values], outputs=[form_family, preset, *values],
                  show_progress="hidden")
    results = [chart, files, samples, status]
    started = ui_shared.job_button(start, _start, [task, project, *values], results, "lorakit_start_training")
    resumed = ui_shared.job_button(resume, _resume, [task, project, resume_run], results, "lorakit_start_training")
    for event in (started, resumed):
        event.then(resumable_runs, inputs=[project], outputs=[resume_run], show_progress="hidden")
    show.click(
        ui_shared.guarded(len(results))(_show),
        inputs=[task],
        outputs=results,
        show_progress="hidden",
        **ui_shared.js("lorakit_train_task"),
    )
    stop.click(ui_shared.guarded(1)(_interrupt), inputs=[task], outputs=[status], **ui_shared.js("lorakit_train_task"))
    return started, planned, follow

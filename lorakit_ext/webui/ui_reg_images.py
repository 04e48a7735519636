"""The Train form's "Generate regularisation images", below "Regularisation folders": A1111's own
txt2img on the loaded model draws them from the dataset's captions without the activation tag into
``<project>/reg/`` (:mod:`lorakit_ext.webui.reg_drawing`, which ``POST …/reg-images`` runs too), as
an A1111 job with its progress bar and Interrupt and with the project's lock held; "Regularisation
folders" then names the folder.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from lorakit_ext.dataset.reg_images import prompts_note, with_reg_line
from lorakit_ext.webui import limits, reg_drawing, ui_shared

# The form fields the drawing reads; the last one it also fills.
FORM_FIELDS = ("trigger", "seed", "resolution", "reg_folders")


def generate(id_task, project_name, count, steps, trigger, seed, resolution, reg_folders):
    """Draws the images; returns (gallery items, the Regularisation folders text, message)."""
    project = ui_shared.current_project(project_name)
    side = int(resolution)
    drawing = reg_drawing.prepare(project, trigger, steps=int(steps), seed=int(seed), width=side, height=side,
                                  count=int(count or 0) or None, by="the tab")
    report = reg_drawing.draw(drawing)
    lines = [report.text(), prompts_note(trigger)]
    folders = reg_folders
    if report.written:
        folders = with_reg_line(reg_folders, project)
        lines.append("Regularisation folders names them." if folders == reg_folders
                     else "Added them to Regularisation folders; they train with the next run.")
    gallery = [(str(path), path.stem) for path in report.written]
    return gallery, folders, ui_shared.ok("\n".join(lines))


def build():
    """The controls, made where they should appear (inside the form's Dataset group); :func:`wire`
    connects them once every form field exists."""
    from modules.ui_components import FormRow

    with gr.Accordion("Generate regularisation images", open=False, elem_id="lorakit_reg"):
        task = ui_shared.task_id_box()
        with FormRow():
            count = gr.Number(label="Images to draw", value=0, precision=0, elem_id="lorakit_reg_count",
                              info="0: one per dataset image; numbering continues after reg/'s files, none is replaced")
            steps = gr.Slider(label="Steps per image", **limits.GRID_STEPS.slider(), value=reg_drawing.DEFAULT_STEPS,
                              elem_id="lorakit_reg_steps")
        with FormRow():
            start = gr.Button("Generate regularisation images", elem_id="lorakit_reg_start")
            stop = gr.Button("Interrupt", elem_id="lorakit_reg_interrupt")
        message = ui_shared.job_message("lorakit_reg_progress")
        gallery = gr.Gallery(label="Regularisation images", columns=6, elem_id="lorakit_reg_gallery")
    return SimpleNamespace(task=task, count=count, steps=steps, start=start, stop=stop, message=message, gallery=gallery)


def wire(controls, project, fields: dict):
    """Start and Interrupt; returns Start's event."""
    controls.stop.click(ui_shared.interrupt_a1111, inputs=[], outputs=[])
    inputs = [controls.task, project, controls.count, controls.steps, *(fields[name] for name in FORM_FIELDS)]
    outputs = [controls.gallery, fields["reg_folders"], controls.message]
    return ui_shared.job_button(controls.start, generate, inputs, outputs, "lorakit_generate_reg_images")

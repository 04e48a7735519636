"""The project row above the sub-tabs: pick a project, or create one with its name checked as typed."""

from __future__ import annotations

import gradio as gr

from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project, validate_name
from lorakit_ext.webui import ui_shared
from lorakit_ext.webui.ui_inputs import last_project, remember_project


def name_check(name: str) -> str:
    if not name.strip():
        return ""
    try:
        validate_name(name.strip())
    except UserError as exc:
        return ui_shared.error(str(exc))
    if name.strip() in ui_shared.project_names():
        return ui_shared.ok(f"{name.strip()} exists already; pick it from the list")
    return ui_shared.ok(f"{name.strip()} is a valid name")


@ui_shared.guarded(3)
def create(name: str):
    project = create_project(ui_shared.projects_root(), name.strip())
    message = f"Created {project.path}: put images into it from the Dataset tab."
    return gr.update(choices=ui_shared.project_names(), value=project.name), "", ui_shared.ok(message)


def _reload():
    """The project list as it is on disk now, showing the project last used."""
    names = ui_shared.project_names()
    return gr.update(choices=names, value=last_project(ui_shared.projects_root(), names))


def build():
    """The row; returns the project dropdown, which every sub-tab takes as an input, and the spec
    that re-reads the list of projects (a project made by the CLI or the API shows up on reload)
    and opens the project last used."""
    from modules.ui_components import FormRow, ToolButton

    names = ui_shared.project_names()
    with gr.Row(elem_id="lorakit_project_row"):
        with gr.Column(scale=3), FormRow():
            project = gr.Dropdown(
                label="Project",
                choices=names,
                value=last_project(ui_shared.projects_root(), names),
                elem_id="lorakit_project",
                info=f"folders in {ui_shared.projects_root()}",
            )
            ui_shared.refresh_button(project, ui_shared.project_names, "lorakit_project_refresh")
        with gr.Column(scale=2), FormRow():
            new_name = gr.Textbox(
                label="New project",
                placeholder="e.g. kat3r1na",
                elem_id="lorakit_new_project",
                info="letters, digits, '-', '_' and '.'; ➕ creates it",
            )
            create_button = ToolButton("\u2795", elem_id="lorakit_create_project", tooltip="create this project")
    message = ui_shared.message("lorakit_project_message")
    new_name.change(name_check, inputs=[new_name], outputs=[message], show_progress="hidden")
    create_button.click(create, inputs=[new_name], outputs=[project, new_name, message])
    project.change(lambda name: remember_project(ui_shared.projects_root(), name), inputs=[project], outputs=[])
    return project, dict(fn=_reload, inputs=[], outputs=[project], show_progress="hidden")

"""One image at a time: preview, caption box with its CLIP token count, previous/next, save.

Going to another image of the same project saves an edited caption first, so paging on never
loses an edit. ``loaded`` remembers which image the box holds and the text it was loaded with.
"""

from __future__ import annotations

import gradio as gr

from lorakit_ext.dataset.captions import read_caption, write_caption
from lorakit_ext.dataset.files import list_images
from lorakit_ext.dataset.tags import MAX_CLIP_TOKENS
from lorakit_ext.errors import UserError
from lorakit_ext.webui import ui_shared
from lorakit_ext.webui.ui_images import PREVIEW_SIDE, preview
from lorakit_ext.webui.ui_inputs import neighbour
from lorakit_ext.webui.ui_tokens import token_counter

NOTHING = {"name": None, "text": ""}


def token_text(text: str) -> str:
    count, exact = token_counter()
    n = count(text)
    how = "" if exact else " (estimated)"
    over = f", over {MAX_CLIP_TOKENS}: the rest spills into a second 75-token chunk" if n > MAX_CLIP_TOKENS else ""
    return f"{n} CLIP tokens{how}{over}"


def _names(project) -> list[str]:
    return [p.name for p in list_images(project.dataset)]


def _save_if_edited(project, text: str, loaded: dict) -> str:
    if not loaded["name"] or text == loaded["text"] or not project.dataset_file(loaded["name"]).is_file():
        return ""
    path = write_caption(project.dataset_file(loaded["name"]), text, project=project)
    return f"Saved {path.name}. "


def _show(project, name: str | None, note: str = "") -> tuple:
    """dropdown, image, caption box, loaded, message."""
    names = _names(project)
    name = name if name in names else neighbour(names, None, 0)
    if name is None:
        return gr.update(choices=[], value=None), None, "", dict(NOTHING), ui_shared.ok(note + "No images in this project yet.")
    image = project.dataset_file(name)
    read = read_caption(image, project=project)
    where = "no caption file yet" if read.source is None else read.source.name
    warning = f" Warning: {read.warning}" if read.warning else ""
    return (
        gr.update(choices=names, value=name),
        preview(image, PREVIEW_SIDE),
        read.text,
        {"name": name, "text": read.text},
        ui_shared.ok(f"{note}{name}: {where}.{warning}"),
    )


def show_current(project_name, loaded):
    """After a project change or a batch edit: the same image if the project has it, re-read."""
    if not project_name:
        return gr.update(choices=[], value=None), None, "", dict(NOTHING), ""
    return _show(ui_shared.current_project(project_name), loaded["name"])


def _jump(project_name, name, text, loaded):
    project = ui_shared.current_project(project_name)
    return _show(project, name, _save_if_edited(project, text, loaded))


def _move(project_name, text, loaded, step):
    project = ui_shared.current_project(project_name)
    note = _save_if_edited(project, text, loaded)
    return _show(project, neighbour(_names(project), loaded["name"], step), note)


def _save(project_name, text, loaded):
    project = ui_shared.current_project(project_name)
    if not loaded["name"]:
        raise UserError("no image is open; pick one first")
    path = write_caption(project.dataset_file(loaded["name"]), text, project=project)
    saved = read_caption(project.dataset_file(loaded["name"]), project=project).text
    return saved, {"name": loaded["name"], "text": saved}, ui_shared.ok(f"Saved {path.name}.")


def build(project):
    """The editor; returns the spec that re-reads it (for a project change or a batch edit) and the
    events that can write a caption: Save, and moving to another image after an edit."""
    from modules.ui_components import FormRow, ToolButton

    loaded = gr.State(dict(NOTHING))
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Image", type="pil", interactive=False, height=PREVIEW_SIDE, elem_id="lorakit_editor_image")
        with gr.Column(scale=3):
            with FormRow():
                previous = ToolButton("◀", elem_id="lorakit_editor_prev", tooltip="previous image (saves an edit first)")
                name = gr.Dropdown(label="Image", choices=[], elem_id="lorakit_editor_name")
                following = ToolButton("▶", elem_id="lorakit_editor_next", tooltip="next image (saves an edit first)")
            caption = gr.Textbox(label="Caption", lines=4, elem_id="lorakit_editor_caption")
            tokens = ui_shared.message("lorakit_editor_tokens")
            save = gr.Button("Save caption", variant="primary", elem_id="lorakit_editor_save")
            message = ui_shared.message("lorakit_editor_message")

    shown = [name, image, caption, loaded, message]
    guard = ui_shared.guarded(len(shown))
    writes = [name.input(guard(_jump), inputs=[project, name, caption, loaded], outputs=shown, show_progress="hidden")]
    for button, step in ((previous, -1), (following, 1)):
        move = guard(lambda name, text, state, s=step: _move(name, text, state, s))
        writes.append(button.click(move, inputs=[project, caption, loaded], outputs=shown, show_progress="hidden"))
    saved = ui_shared.guarded(3)(_save)
    writes.append(save.click(saved, inputs=[project, caption, loaded], outputs=[caption, loaded, message]))
    caption.change(token_text, inputs=[caption], outputs=[tokens], show_progress="hidden")
    return dict(fn=guard(show_current), inputs=[project, loaded], outputs=shown, show_progress="hidden"), writes

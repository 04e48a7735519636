"""The Dataset sub-tab: import (server folder or upload), near-duplicates, and undo of removals."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lorakit_ext.dataset.captions import caption_source
from lorakit_ext.dataset.files import list_images
from lorakit_ext.dataset.importer import import_files, import_folder
from lorakit_ext.dataset.trash import list_batches, undo
from lorakit_ext.errors import UserError
from lorakit_ext.webui import ui_dedupe, ui_shared, ui_tables
from lorakit_ext.webui.ui_inputs import upload_names


def overview(project_name) -> tuple[dict, str]:
    """The removal batches of the current project and the dataset line."""
    if not project_name:
        return ui_tables.table(ui_tables.BATCH_HEADERS, []), ""
    project = ui_shared.current_project(project_name)
    images = list_images(project.dataset)
    captioned = sum(1 for p in images if caption_source(p) is not None)
    batches = list_batches(project)
    pending = sum(1 for b in batches if not b.restored)
    text = f"{len(images)} images in {project.dataset}, {captioned} with a caption; {pending} removal batch(es) can be undone."
    return ui_tables.table(ui_tables.BATCH_HEADERS, ui_tables.batch_rows(batches)), ui_shared.ok(text)


def _report(report) -> tuple[dict, str]:
    return ui_tables.table(ui_tables.IMPORT_HEADERS, ui_tables.import_rows(report)), ui_shared.ok(
        ui_tables.import_summary(report)
    )


def _import_folder(project_name, folder: str, recursive: bool):
    from lorakit_ext.webui import host

    project = ui_shared.current_project(project_name)
    if not folder.strip():
        raise UserError("enter the server folder that holds the images")
    source = host.check_path_access(folder.strip(), "import images from")
    return _report(import_folder(project, source, recursive))


def _import_uploads(project_name, files):
    project = ui_shared.current_project(project_name)
    paths, names = upload_names(files)
    rows, message = _report(import_files(project, paths, names))
    return rows, None, message


def _undo(project_name):
    from lorakit_ext.webui import host

    project = ui_shared.current_project(project_name)
    # Promote can move epoch files out of the Lora folder; their batch restores them there.
    batch = undo(project, None, allowed_bases=(host.lora_dir(),))
    if any(Path(f.original_path).is_absolute() for f in batch.files):
        host.refresh_loras()
    return ui_shared.ok(f"Restored {len(batch.files)} files from batch {batch.id} ({batch.reason}).")


def build(project):
    """The sub-tab; returns its refresh spec and the events that change the dataset."""
    from modules.ui_components import FormRow

    info = ui_shared.message("lorakit_dataset_info")
    with gr.Accordion("Import images", open=True):
        with gr.Row():
            with gr.Column():
                with FormRow():
                    folder = gr.Textbox(
                        label="Server folder", placeholder="/path/to/images", elem_id="lorakit_import_folder", scale=4
                    )
                    recursive = gr.Checkbox(label="Include sub-folders", value=False, elem_id="lorakit_import_recursive")
                folder_button = gr.Button("Import folder", elem_id="lorakit_import_folder_button")
            with gr.Column():
                uploads = gr.File(
                    label="Upload images (with same-name .txt captions)", file_count="multiple", elem_id="lorakit_import_upload"
                )
                upload_button = gr.Button("Import uploads", elem_id="lorakit_import_upload_button")
        import_message = ui_shared.message("lorakit_import_message")
        import_table = gr.Dataframe(
            headers=list(ui_tables.IMPORT_HEADERS), interactive=False, wrap=True, elem_id="lorakit_import_report"
        )
    with gr.Accordion("Near-duplicates", open=True):
        applied = ui_dedupe.build(project)
    with gr.Accordion("Removed files", open=False):
        with gr.Row():
            undo_button = gr.Button("Undo the last removal", elem_id="lorakit_undo")
        undo_message = ui_shared.message("lorakit_undo_message")
        batches = gr.Dataframe(headers=list(ui_tables.BATCH_HEADERS), interactive=False, wrap=True, elem_id="lorakit_batches")

    refresh = dict(fn=ui_shared.guarded(2)(overview), inputs=[project], outputs=[batches, info], show_progress="hidden")
    project.change(**refresh)
    changes = [
        folder_button.click(
            ui_shared.guarded(2)(_import_folder), inputs=[project, folder, recursive], outputs=[import_table, import_message]
        ),
        upload_button.click(
            ui_shared.guarded(3)(_import_uploads), inputs=[project, uploads], outputs=[import_table, uploads, import_message]
        ),
        undo_button.click(ui_shared.guarded(1)(_undo), inputs=[project], outputs=[undo_message]),
        applied,
    ]
    for change in changes:
        change.then(**refresh)
    return refresh, changes

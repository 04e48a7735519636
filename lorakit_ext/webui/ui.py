"""The "LoRA Kit" tab: the project row, then Dataset → Captions → Train → Compare.

Each sub-tab lives in its own module and returns the refresh specs (``fn``/``inputs``/``outputs``)
that fill it from disk; they run on every page load, so a reload or a second browser shows what
is on disk now rather than what was there when the WebUI started.
"""

from __future__ import annotations

import gradio as gr

from lorakit_ext.webui import ui_captions, ui_compare, ui_dataset, ui_project, ui_train
from lorakit_ext.webui.entry import TAB_ID, TAB_TITLE


def build_tab() -> tuple:
    """``(blocks, title, id)`` for ``script_callbacks.on_ui_tabs``."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        project, projects = ui_project.build()
        with gr.Tabs(elem_id="lorakit_tabs"):
            with gr.Tab("Dataset", id="lorakit_dataset", elem_id="lorakit_tab_dataset"):
                dataset, dataset_changes = ui_dataset.build(project)
            with gr.Tab("Captions", id="lorakit_captions", elem_id="lorakit_tab_captions"):
                captions = ui_captions.build(project)
            with gr.Tab("Train", id="lorakit_train", elem_id="lorakit_tab_train") as train_tab:
                trained, planned, follow_model = ui_train.build(project)
            with gr.Tab("Compare", id="lorakit_compare", elem_id="lorakit_tab_compare"):
                compared, promoted = ui_compare.build(project)
        # What one sub-tab changes on disk, the others show at once: new or removed images in the
        # captions and the plan, a finished training's run and epoch files in Compare, epochs a
        # promotion removed in the Dataset tab's list of removals.
        for change in dataset_changes:
            for spec in (*captions, planned):
                change.then(**spec)
        trained.then(**compared)
        promoted.then(**dataset)
        for spec in (projects, dataset, *captions, planned, compared):
            blocks.load(**spec)
        # The checkpoint can change between page loads (the checkpoint list), so the form checks
        # its family whenever the Train tab is opened.
        for event in (blocks.load, train_tab.select):
            event(**follow_model).then(**planned)
    return blocks, TAB_TITLE, TAB_ID

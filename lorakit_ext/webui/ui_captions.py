"""The Captions sub-tab: caption with a model, edit one caption, batch tag tools, counts and lint."""

from __future__ import annotations

import gradio as gr

from lorakit_ext.webui import ui_caption_editor, ui_caption_run, ui_tags


def build(project) -> list[dict]:
    """Builds the sub-tab; returns the refresh specs to run when the page loads."""
    with gr.Accordion("Caption with a model", open=True):
        captioned = ui_caption_run.build(project)
    with gr.Accordion("Edit captions one by one", open=True):
        editor, edits = ui_caption_editor.build(project)
    with gr.Accordion("Batch tag tools, tag counts and lint", open=True):
        applied, (counted, linted) = ui_tags.build(project)
    refreshes = [editor, counted, linted]
    for event in (captioned, applied):
        event.then(**editor).then(**counted).then(**linted)
    # A caption saved in the editor changes the counts and the lint as much as a batch edit.
    for event in edits:
        event.then(**counted).then(**linted)
    for spec in refreshes:
        project.change(**spec)
    return refreshes

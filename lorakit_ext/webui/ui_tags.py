"""Batch tag operations (preview, then apply), tag counts and the caption lint."""

from __future__ import annotations

import gradio as gr

from lorakit_ext.dataset.captions import load_captions
from lorakit_ext.dataset.curation import apply_tag_ops
from lorakit_ext.dataset.tags import MODES, TagOps, lint_captions, tag_counts
from lorakit_ext.webui import ui_shared, ui_tables
from lorakit_ext.webui.ui_tokens import token_counter


def _ops(dedupe, sort, remove, search, replace, mode, trigger) -> TagOps:
    return TagOps(dedupe=dedupe, sort=sort, remove=remove, search=search, replace=replace, mode=mode, trigger=trigger)


def _run_ops(project_name, dry_run: bool, *form):
    project = ui_shared.current_project(project_name)
    changes = apply_tag_ops(project, _ops(*form), dry_run=dry_run)
    rows = ui_tables.change_rows(changes)
    return ui_tables.table(ui_tables.CHANGE_HEADERS, rows), ui_shared.ok(ui_tables.change_summary(changes, dry_run))


def _counts(project_name):
    if not project_name:
        return ui_tables.table(ui_tables.TAG_HEADERS, []), ""
    captions = load_captions(ui_shared.current_project(project_name))
    counts = tag_counts(captions.values())
    summary = f"{len(counts)} distinct tags in {len(captions)} captions."
    return ui_tables.table(ui_tables.TAG_HEADERS, ui_tables.tag_count_rows(counts)), ui_shared.ok(summary)


def _lint(project_name, trigger):
    if not project_name:
        return ui_tables.table(ui_tables.LINT_HEADERS, []), ""
    captions = load_captions(ui_shared.current_project(project_name))
    count, exact = token_counter()
    report = lint_captions(captions, trigger, count if exact else None)
    return ui_tables.table(ui_tables.LINT_HEADERS, ui_tables.lint_rows(report)), ui_shared.ok(ui_tables.lint_summary(report))


def build(project):
    """The batch tools; returns (the apply event, the refresh spec for counts and lint)."""
    from modules.ui_components import FormRow

    with FormRow():
        dedupe = gr.Checkbox(label="Remove repeated tags", value=False, elem_id="lorakit_tags_dedupe")
        sort = gr.Checkbox(label="Sort tags", value=False, elem_id="lorakit_tags_sort")
        trigger = gr.Textbox(
            label="Activation tag to put first",
            placeholder="kat3r1na",
            info="goes first in every caption; the lint checks for it",
            elem_id="lorakit_tags_trigger",
        )
    with FormRow():
        remove = gr.Textbox(label="Remove tags", placeholder="watermark, signature", elem_id="lorakit_tags_remove")
        search = gr.Textbox(label="Search tags", placeholder="1girl, solo", elem_id="lorakit_tags_search")
        replace = gr.Textbox(label="Replace with", placeholder="woman", elem_id="lorakit_tags_replace")
        mode = gr.Radio(
            label="Search matches when",
            choices=list(MODES),
            value="or",
            info="or: any searched tag is present · and: all are",
            elem_id="lorakit_tags_mode",
        )
    with gr.Row():
        preview = gr.Button("Preview changes", elem_id="lorakit_tags_preview")
        apply_button = gr.Button("Apply to all captions", variant="primary", elem_id="lorakit_tags_apply")
    ops_message = ui_shared.message("lorakit_tags_message")
    changes = gr.Dataframe(headers=list(ui_tables.CHANGE_HEADERS), interactive=False, wrap=True, elem_id="lorakit_tags_changes")
    with gr.Row():
        with gr.Column():
            counts_button = gr.Button("Count tags", elem_id="lorakit_tags_count")
            counts_message = ui_shared.message("lorakit_tags_count_message")
            counts = gr.Dataframe(headers=list(ui_tables.TAG_HEADERS), interactive=False, elem_id="lorakit_tag_counts")
        with gr.Column():
            lint_button = gr.Button("Check captions", elem_id="lorakit_lint")
            lint_message = ui_shared.message("lorakit_lint_message")
            lint = gr.Dataframe(headers=list(ui_tables.LINT_HEADERS), interactive=False, wrap=True, elem_id="lorakit_lint_table")

    form = [dedupe, sort, remove, search, replace, mode, trigger]
    preview.click(
        ui_shared.guarded(2)(lambda p, *f: _run_ops(p, True, *f)), inputs=[project, *form], outputs=[changes, ops_message]
    )
    applied = apply_button.click(
        ui_shared.guarded(2)(lambda p, *f: _run_ops(p, False, *f)), inputs=[project, *form], outputs=[changes, ops_message]
    )
    counted = dict(fn=ui_shared.guarded(2)(_counts), inputs=[project], outputs=[counts, counts_message], show_progress="hidden")
    linted = dict(fn=ui_shared.guarded(2)(_lint), inputs=[project, trigger], outputs=[lint, lint_message], show_progress="hidden")
    counts_button.click(**counted)
    lint_button.click(**linted)
    return applied, (counted, linted)

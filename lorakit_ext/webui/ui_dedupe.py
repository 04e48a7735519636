"""Near-duplicate clusters: find, look at each cluster's thumbnails, pick the keeper, apply.

gradio 3 cannot add components after the page is built, so a page holds a fixed number of
cluster slots and a pager walks through the clusters. The plan, the user's picks and the page
live in one ``gr.State``; Apply moves exactly what the shown plan says, through
``dedupe.apply_plan``, which refuses if the dataset changed since the plan was made.
"""

from __future__ import annotations

import gradio as gr

from lorakit_ext.dataset.dedupe import DEFAULT_METHOD, DEFAULT_THRESHOLDS, HASH_SIZE, METHODS, apply_plan, plan_dedupe
from lorakit_ext.errors import UserError
from lorakit_ext.webui import ui_shared, ui_tables
from lorakit_ext.webui.ui_images import preview

SLOTS = 5


def _state(plan=None, project=None, overrides=None, page=0) -> dict:
    return {"plan": plan, "project": project, "overrides": dict(overrides or {}), "page": page}


def _slot_clusters(state: dict) -> tuple[list, int, str]:
    """The clusters on the current page, the number of pages, and the pager's text."""
    plan = state["plan"]
    if plan is None:
        return [], 1, ""
    start, end, page, pages = ui_tables.page_bounds(len(plan.clusters), state["page"], SLOTS)
    shown = plan.clusters[start:end]
    text = f"Clusters {start + 1}–{end} of {len(plan.clusters)} (page {page + 1}/{pages})" if shown else ""
    return shown, pages, text


def _gallery_items(project, cluster, keep: str) -> list:
    return [(preview(project.dataset_file(m.name)), ui_tables.member_caption(m, keep)) for m in cluster.members]


def _render(state: dict) -> list:
    """Every slot's (group, gallery, radio) updates, then the pager, its text and the summary."""
    shown, pages, page_text = _slot_clusters(state)
    keep = ui_tables.resolved_keep(state["plan"], state["overrides"]) if state["plan"] else {}
    project = ui_shared.current_project(state["project"]) if shown else None
    out = []
    for slot in range(SLOTS):
        if slot < len(shown):
            cluster = shown[slot]
            names = [m.name for m in cluster.members]
            out += [
                gr.update(visible=True),
                gr.update(
                    value=_gallery_items(project, cluster, keep[cluster.id]),
                    label=ui_tables.cluster_label(cluster, keep[cluster.id]),
                ),
                gr.update(choices=names, value=keep[cluster.id]),
            ]
        else:
            out += [gr.update(visible=False), gr.update(value=None), gr.update(choices=[], value=None)]
    summary = ui_tables.dedupe_summary(state["plan"], state["overrides"]) if state["plan"] else ""
    return out + [gr.update(visible=pages > 1), page_text, ui_shared.ok(summary)]


def _find(project_name, method, threshold):
    project = ui_shared.current_project(project_name)
    plan = plan_dedupe(project, method, int(threshold))
    state = _state(plan, project.name)
    return [state, *_render(state)]


def _turn(state, delta):
    if state["plan"] is None:
        raise UserError("find duplicates first")
    _, _, page, _ = ui_tables.page_bounds(len(state["plan"].clusters), state["page"] + delta, SLOTS)
    state = _state(state["plan"], state["project"], state["overrides"], page)
    return [state, *_render(state)]


def _pick(state, slot: int, name: str):
    """The user chose ``name`` as keeper of the cluster shown in ``slot``: that slot and the
    summary change, nothing else is re-rendered."""
    shown, _, _ = _slot_clusters(state)
    if state["plan"] is None or slot >= len(shown) or not name:
        return [state, gr.update(), gr.update(), gr.update()]
    cluster = shown[slot]
    state = _state(state["plan"], state["project"], {**state["overrides"], cluster.id: name}, state["page"])
    project = ui_shared.current_project(state["project"])
    return [
        state,
        gr.update(value=_gallery_items(project, cluster, name), label=ui_tables.cluster_label(cluster, name)),
        gr.update(value=name),
        ui_shared.ok(ui_tables.dedupe_summary(state["plan"], state["overrides"])),
    ]


def _apply(project_name, state):
    project = ui_shared.current_project(project_name)
    plan = state["plan"]
    if plan is None:
        raise UserError("find duplicates first")
    if state["project"] != project.name:
        raise UserError(f"these clusters belong to project {state['project']}; find duplicates in {project.name} again")
    if not plan.clusters:
        raise UserError("there are no duplicates to remove")
    batch = apply_plan(project, plan, state["overrides"])
    cleared = _state()
    message = f"Moved {len(batch.files)} files to {batch.folder}; Undo below brings them back."
    return [cleared, *_render(cleared)[:-1], ui_shared.ok(message)]


def build(project):
    """The dedupe section; returns the Apply event so the caller can refresh what it changed."""
    from modules.ui_components import FormRow, ToolButton

    state = gr.State(_state())
    with FormRow():
        method = gr.Dropdown(
            label="Hash",
            choices=list(METHODS),
            value=DEFAULT_METHOD,
            elem_id="lorakit_dedupe_method",
            info="phash is the calibrated default",
        )
        threshold = gr.Slider(
            label="Max distance (bits)",
            minimum=0,
            maximum=HASH_SIZE * HASH_SIZE - 1,
            step=1,
            value=DEFAULT_THRESHOLDS[DEFAULT_METHOD],
            elem_id="lorakit_dedupe_threshold",
            info="pairs this close are checked by aligning the two images; higher checks more pairs (slower)",
        )
    with gr.Row():
        find = gr.Button("Find duplicates", variant="primary", elem_id="lorakit_dedupe_find")
        apply_button = gr.Button("Apply: move the others to _removed/", elem_id="lorakit_dedupe_apply")
    summary = ui_shared.message("lorakit_dedupe_summary")
    with FormRow(elem_id="lorakit_dedupe_pager", visible=False) as pager:
        previous = ToolButton("◀", elem_id="lorakit_dedupe_prev", tooltip="previous clusters")
        page_text = ui_shared.message("lorakit_dedupe_page")
        following = ToolButton("▶", elem_id="lorakit_dedupe_next", tooltip="next clusters")
    slots = []
    for i in range(SLOTS):
        with gr.Group(visible=False) as group:
            # style.css sizes it to its rows of thumbnails.
            gallery = gr.Gallery(
                columns=6, object_fit="contain", allow_preview=False, elem_id=f"lorakit_cluster_{i}",
                elem_classes=["lorakit_cluster"],
            )
            radio = gr.Radio(label="Keep", choices=[], elem_id=f"lorakit_cluster_keep_{i}")
        slots.append((group, gallery, radio))
    rendered = [c for slot in slots for c in slot] + [pager, page_text, summary]

    method.change(lambda m: DEFAULT_THRESHOLDS[m], inputs=[method], outputs=[threshold], show_progress="hidden")
    find.click(ui_shared.guarded(len(rendered) + 1)(_find), inputs=[project, method, threshold], outputs=[state, *rendered])
    for button, delta in ((previous, -1), (following, 1)):
        button.click(
            ui_shared.guarded(len(rendered) + 1)(lambda s, d=delta: _turn(s, d)), inputs=[state], outputs=[state, *rendered]
        )
    for i, (_, gallery, radio) in enumerate(slots):
        outputs = [state, gallery, radio, summary]

        @ui_shared.guarded(len(outputs))
        def by_radio(s, name, slot=i):
            return _pick(s, slot, name)

        @ui_shared.guarded(len(outputs))
        def by_click(s, evt: gr.SelectData, slot=i):
            shown, _, _ = _slot_clusters(s)
            name = shown[slot].members[evt.index].name if slot < len(shown) else None
            return _pick(s, slot, name)

        radio.input(by_radio, inputs=[state, radio], outputs=outputs, show_progress="hidden")
        gallery.select(by_click, inputs=[state], outputs=outputs, show_progress="hidden")
    project.change(lambda: [_state(), *_render(_state())], inputs=[], outputs=[state, *rendered], show_progress="hidden")
    return apply_button.click(ui_shared.guarded(len(rendered) + 1)(_apply), inputs=[project, state], outputs=[state, *rendered])

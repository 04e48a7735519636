"""The LoRA Kit tab built with A1111's real ``modules`` and gradio (3.41 in A1111 1.6–1.10), and
its handlers run against projects on disk.

A1111 starts in-process as ``a1111_inprocess.py`` describes (skipped unless ``LORAKIT_A1111_DIR``
is set); run with that WebUI's Python:

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration/test_ui_build.py
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
from a1111_inprocess import skip_reason, start
from PIL import Image

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
REPO = Path(__file__).resolve().parents[2]
JS = (REPO / "javascript" / "lorakit.js").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def a1111():
    return start().shared


@pytest.fixture(scope="module")
def wrapped(a1111):
    """The handlers the tab hands to ``wrap_gradio_gpu_call``, recorded while it builds."""
    from modules import call_queue

    seen = []
    original = call_queue.wrap_gradio_gpu_call

    def recording(func, extra_outputs=None):
        seen.append(inspect.unwrap(func))
        return original(func, extra_outputs=extra_outputs)

    call_queue.wrap_gradio_gpu_call = recording
    yield seen
    call_queue.wrap_gradio_gpu_call = original


@pytest.fixture(scope="module")
def tab(a1111, wrapped):
    from lorakit_ext.webui import ui

    return ui.build_tab()


def by_elem_id(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def deps_of(blocks, component, trigger: str) -> list[dict]:
    return [d for d in blocks.dependencies if component._id in d["targets"] and d["trigger"] == trigger]


def test_tab_has_title_id_and_four_sub_tabs(tab):
    import gradio as gr

    blocks, title, tab_id = tab
    assert isinstance(blocks, gr.Blocks) and (title, tab_id) == ("LoRA Kit", "lorakit")
    labels = [b.label for b in blocks.blocks.values() if isinstance(b, gr.TabItem)]
    assert labels == ["Dataset", "Captions", "Train", "Compare"]


def test_every_train_config_field_has_its_component(tab):
    import gradio as gr

    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui.ui_form import form_specs

    ids = by_elem_id(tab[0])
    kinds = {"checkbox": gr.Checkbox, "dropdown": gr.Dropdown, "slider": gr.Slider, "number": gr.Number, "textbox": gr.Textbox}
    specs = form_specs()
    assert len(specs) == len(TrainConfig.field_specs())
    for spec in specs:
        component = ids[spec.elem_id]
        assert type(component) is kinds[spec.kind], spec.name
        assert component.label == spec.label and component.info == spec.info
        if spec.kind == "slider":
            assert (component.minimum, component.maximum, component.step) == (spec.minimum, spec.maximum, spec.step)
        if spec.kind == "dropdown":
            assert [c[0] if isinstance(c, tuple) else c for c in component.choices] == list(spec.choices)


@pytest.mark.parametrize(
    "button, js, handler",
    [
        ("lorakit_train_start", "lorakit_start_training", "lorakit_ext.webui.ui_train._start"),
        ("lorakit_caption_start", "lorakit_run_captioner", "lorakit_ext.webui.ui_caption_run.run"),
        ("lorakit_grid_start", "lorakit_render_grid", "lorakit_ext.webui.ui_compare._grid"),
        ("lorakit_reg_start", "lorakit_generate_reg_images", "lorakit_ext.webui.ui_reg_images.generate"),
    ],
)
def test_job_buttons_use_a1111s_progress_pattern(tab, wrapped, button, js, handler):
    """The button runs our JS (which sets the task id and calls requestProgress), its first input is
    the hidden task-id box, its handler went through wrap_gradio_gpu_call, and the message box the
    progress bar sits on (<prefix>_progress) is its last output."""
    import gradio as gr

    blocks = tab[0]
    ids = by_elem_id(blocks)
    (dep,) = deps_of(blocks, ids[button], "click")
    assert dep["js"] == js and f"function {js}(" in JS
    first = blocks.blocks[dep["inputs"][0]]
    assert isinstance(first, gr.Textbox) and not first.visible
    module, name = handler.rsplit(".", 1)
    assert getattr(sys.modules[module], name) in wrapped
    prefix = re.search(rf'function {js}\(\) {{[^}}]*lorakitSubmit\("(\w+)"', JS).group(1)
    assert blocks.blocks[dep["outputs"][-1]].elem_id == f"{prefix}_progress"


def test_interrupt_and_progress_buttons_do_not_take_the_queue_lock(tab, wrapped):
    from lorakit_ext.webui import ui_train

    ids = by_elem_id(tab[0])
    for button in ("lorakit_train_interrupt", "lorakit_train_poll"):
        (dep,) = deps_of(tab[0], ids[button], "click")
        assert dep["js"] == "lorakit_train_task"
    assert ui_train._interrupt not in wrapped and ui_train._show not in wrapped


def test_every_js_hook_is_defined(tab):
    named = {d["js"] for d in tab[0].dependencies if d["js"]}
    defined = set(re.findall(r"^function (\w+)\(", JS, re.M))
    assert named <= defined


def test_labels_a1111_saves_defaults_for_are_unique(tab):
    """A1111's ui-config.json keys components by tab and label: two inputs with one label would
    share (and overwrite) each other's saved defaults."""
    import gradio as gr

    tracked = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown)
    labels = [b.label for b in tab[0].blocks.values() if type(b) in tracked and b.visible and b.label]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    assert duplicates in ([], ["Keep"])  # the dedupe slots' "Keep" radios have no choices to save


def test_fill_button_is_a_send_to_txt2img_binding(tab):
    from modules import infotext_utils

    send = by_elem_id(tab[0])["lorakit_xyz_send"]
    (binding,) = [b for b in infotext_utils.registered_param_bindings if b.paste_button is send]
    assert binding.tabname == "txt2img" and binding.source_text_component.elem_id == "lorakit_xyz_infotext"


def test_fill_infotext_parses_back_to_the_xyz_fields(a1111):
    from modules.infotext_utils import parse_generation_parameters

    from lorakit_ext.webui import ui_compare

    prompt = "kat3r1na, a photograph <lora:kat-01:1>"
    text = ui_compare.fill_infotext(["kat-01", "kat-02"], prompt, "blurry", "1, 2", "0.5, 1", True, 20, 512, 7.0)
    params = parse_generation_parameters(text)
    assert params["Prompt"] == "kat3r1na, a photograph <lora:kat-01:te=0:unet=0:0.5>"
    assert params["Negative prompt"] == "blurry"
    assert params["Script"] == "X/Y/Z plot"
    assert (params["X Type"], params["X Values"]) == ("Prompt S/R", "kat-01:te=0:unet=0, kat-01, kat-02")
    assert (params["Y Type"], params["Y Values"]) == ("Seed", "1, 2")
    assert (params["Z Type"], params["Z Values"]) == ("Prompt S/R", "0.5, 1.0")
    assert (params["Size-1"], params["Steps"]) == ("512", "20")


# ---- handlers against a project on disk ----------------------------------------------------------
@pytest.fixture
def projects(a1111, tmp_path, monkeypatch):
    monkeypatch.setitem(a1111.opts.data, "lorakit_projects_root", str(tmp_path / "projects"))
    return tmp_path


def picture(path: Path, seed: int, size=(256, 192)):
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size).save(path)
    return path


def test_dataset_flow_create_import_dedupe_undo(projects):
    from lorakit_ext.webui import ui_dataset, ui_dedupe, ui_project

    dropdown, cleared, message = ui_project.create("kat")
    assert dropdown["value"] == "kat" and "Created" in message
    assert "error" in ui_project.name_check("bad/name") and "valid" in ui_project.name_check("kat2")
    source = projects / "photos"
    source.mkdir()
    a = picture(source / "a.png", 1)
    Image.open(a).resize((128, 96)).save(source / "a_small.png")
    picture(source / "b.png", 2)
    (source / "notes.txt").write_text("stray")
    rows, summary = ui_dataset._import_folder("kat", str(source), False)
    assert "Imported 3 images" in summary and {r[0] for r in rows["data"]} == {"imported"}

    state, *rendered = ui_dedupe._find("kat", "phash", 6)
    assert len(state["plan"].clusters) == 1 and rendered[0]["visible"] is True
    assert "Cluster 1" in rendered[1]["label"] and rendered[2]["value"] == "a.png"
    state, gallery, radio, _ = ui_dedupe._pick(state, 0, "a_small.png")
    assert radio["value"] == "a_small.png" and "keeping a_small.png" in gallery["label"]
    state, *rendered = ui_dedupe._apply("kat", state)
    assert "Moved 1 files" in rendered[-1]
    images = sorted(p.name for p in (projects / "projects" / "kat" / "dataset").iterdir())
    assert images == ["a_small.png", "b.png"]
    batches, info = ui_dataset.overview("kat")
    assert len(batches["data"]) == 1 and "2 images" in info
    assert "Restored 1 files" in ui_dataset._undo("kat")


def test_caption_editor_tags_lint_and_plan(projects):
    from lorakit_ext.project import create_project
    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui import ui_caption_editor, ui_form, ui_tags, ui_train

    project = create_project(projects / "projects", "kat")
    for i, name in enumerate(("a.png", "b.png")):
        picture(project.dataset / name, i)
    dropdown, image, text, loaded, message = ui_caption_editor.show_current("kat", dict(ui_caption_editor.NOTHING))
    assert dropdown["value"] == "a.png" and image.size[0] <= 640 and text == ""
    # Moving on saves the edit first.
    dropdown, _, _, loaded, message = ui_caption_editor._move("kat", "blue eyes, blue eyes", loaded, 1)
    assert dropdown["value"] == "b.png" and message.startswith("Saved a.txt")
    assert (project.dataset / "a.txt").read_text(encoding="utf-8") == "blue eyes, blue eyes"
    assert "CLIP tokens" in ui_caption_editor.token_text("blue eyes")

    rows, summary = ui_tags._run_ops("kat", True, True, False, "", "", "", "or", "kat3r1na")
    assert rows["data"] == [["a.png", "blue eyes, blue eyes", "kat3r1na, blue eyes"], ["b.png", "(no caption file)", "kat3r1na"]]
    assert not (project.dataset / "b.txt").exists()
    ui_tags._run_ops("kat", False, True, False, "", "", "", "or", "kat3r1na")
    assert (project.dataset / "b.txt").read_text(encoding="utf-8") == "kat3r1na"
    counts, _ = ui_tags._counts("kat")
    assert counts["data"][0] == ["kat3r1na", 2]
    lint, lint_message = ui_tags._lint("kat", "kat3r1na")
    assert lint["data"] == [] and "no problems" in lint_message

    values = ui_form.config_values(ui_train.SPECS, TrainConfig())
    plan = ui_train._plan("kat", *values)
    assert plan.startswith("Found 2 images with 10 repeats, equaling 20 steps.") and "After bucketing" in plan


def handler(blocks, elem_id: str):
    """The function gradio calls when the button ``elem_id`` is clicked (wrappers included)."""
    button = by_elem_id(blocks)[elem_id]
    (index,) = [i for i, d in enumerate(blocks.dependencies) if button._id in d["targets"] and d["trigger"] == "click"]
    return blocks.fns[index].fn


def test_train_then_compare_and_promote_from_the_tab(tab, projects, a1111, monkeypatch):
    """Start → epoch files, loss curve and A1111's timing under the status; then the Compare tab
    finds the run, draws its grid and promotes an epoch with card and preview."""
    import pandas as pd

    from lorakit_ext.project import create_project
    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui import ui_compare, ui_form, ui_train

    for key, value in (("lorakit_grid_size", 64), ("lorakit_grid_steps", 2), ("lorakit_auto_grid", False)):
        monkeypatch.setitem(a1111.opts.data, key, value)
    project = create_project(projects / "projects", "kat")
    for i in range(2):
        picture(project.dataset / f"{i}.png", i, (64, 64))
        (project.dataset / f"{i}.txt").write_text("kat3r1na, red", encoding="utf-8")
    config = TrainConfig(
        output_name="uikat",
        trigger="kat3r1na",
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        num_repeats=1,
        max_train_epochs=2,
        train_batch_size=1,
        cache_latents=True,
        optimizer="AdamW",
    )
    chart, files, samples, status = handler(tab[0], "lorakit_train_start")(
        "task(uitest1)", "kat", *ui_form.config_values(ui_train.SPECS, config)
    )
    assert "Finished" in status and "Time taken" in status, status
    assert [row[0] for row in files["data"]] == ["uikat-01.safetensors", "uikat-02.safetensors"]
    assert isinstance(chart, pd.DataFrame) and list(chart.columns) == ["step", "loss", "series"]
    # The training loss per step and the validation loss of both epochs, as two lines.
    assert set(chart["series"]) == {"training", "validation"} and (chart["series"] == "validation").sum() == 2
    assert ui_train._show("task(uitest1)")[1] == files
    assert "suggested: uikat-0" in status and "no grid" in status

    run, epochs, epoch, prompt, trigger, info, report = ui_compare._select("kat")
    assert epochs["value"] == ["uikat-01", "uikat-02"] and trigger == "kat3r1na"
    # Promote starts at the suggested epoch, which the report names with its validation loss.
    assert f"suggested: {epoch['value']} — lowest validation loss" in report, report
    assert prompt.startswith("kat3r1na, a photograph") and "<lora:uikat-01:1>" in prompt
    gallery, grid, report, epoch, message = handler(tab[0], "lorakit_grid_start")(
        "task(uitest2)", "kat", run["value"], epochs["value"], prompt, "", "1, 2", "", True, 2, 64, 7.0
    )
    assert "Grid saved as" in message, message
    assert sorted(grid.cells) == sorted((c, s, 1.0) for c in ("no LoRA", "uikat-01", "uikat-02") for s in (1, 2))
    # Measured from A1111's own cells: every epoch row has an effect number, and the mark is explained.
    rows = [line for line in report.splitlines() if line.startswith("uikat-0")]
    assert len(rows) == 2 and all("–" not in row.split()[2] for row in rows), report
    assert gallery[0][1].startswith("epoch grid — ") and "suggest" in report.splitlines()[-1], report
    result = ui_compare._promote("kat", run["value"], "uikat-02", 0.8, "test card", "kat3r1na", True, grid)
    lora_dir = Path(a1111.cmd_opts.lora_dir)
    assert "Promoted uikat-02.safetensors as uikat-gen0.safetensors" in result
    assert (lora_dir / "uikat-gen0.preview.png").is_file() and (lora_dir / "uikat-gen0.json").is_file()
    assert not (lora_dir / "uikat-01.safetensors").exists()  # moved to _removed/, undo restores it


def test_captioner_runs_as_an_a1111_job(tab, projects, monkeypatch):
    """Caption images: the handler runs under wrap_gradio_gpu_call and writes what the captioner
    says (a stand-in here: BLIP and WD would need their weights)."""
    from lorakit_ext.project import create_project
    from lorakit_ext.webui import ui_caption_run

    class Stub:
        name = "stub"

        def load(self, device, dtype):
            pass

        def caption(self, images):
            return ["red hair, smile"] * len(images)

        def unload(self):
            pass

    monkeypatch.setattr(ui_caption_run, "build_captioner", lambda choice, options: Stub())
    project = create_project(projects / "projects", "kat")
    for i in range(2):
        picture(project.dataset / f"{i}.png", i)
    options = ("Salesforce/blip-image-captioning-large", "", 1, 10, 75, "SmilingWolf/wd-vit-tagger-v3", 0.35, 0.85, "", False)
    rows, message = handler(tab[0], "lorakit_caption_start")(
        "task(uicap)", "kat", "Photo captions (BLIP)", "missing", 8, *options
    )
    assert "wrote 2 of 2 captions" in message and "Time taken" in message, message
    assert rows["data"] == [["0.png", "red hair, smile"], ["1.png", "red hair, smile"]]


def chained_outputs(blocks, dep_index: int) -> list[set]:
    """The output elem_ids of each ``.then`` chained after dependency ``dep_index``, in order."""
    chain, current = [], dep_index
    while True:
        nexts = [i for i, d in enumerate(blocks.dependencies) if d["trigger"] == "then" and d.get("trigger_after") == current]
        if not nexts:
            return chain
        current = nexts[0]
        chain.append({blocks.blocks[o].elem_id for o in blocks.dependencies[current]["outputs"]})


def test_saving_a_caption_refreshes_the_tag_counts_and_the_lint(tab):
    """Save, and paging on after an edit (which saves it), re-read the counts and the lint."""
    blocks = tab[0]
    ids = by_elem_id(blocks)
    for elem_id, trigger in (("lorakit_editor_save", "click"), ("lorakit_editor_next", "click"),
                             ("lorakit_editor_prev", "click"), ("lorakit_editor_name", "input")):
        (index,) = [i for i, d in enumerate(blocks.dependencies) if ids[elem_id]._id in d["targets"] and d["trigger"] == trigger]
        chain = chained_outputs(blocks, index)
        assert {"lorakit_tag_counts", "lorakit_tags_count_message"} in chain, (elem_id, chain)
        assert {"lorakit_lint_table", "lorakit_lint_message"} in chain, (elem_id, chain)


def test_the_tab_opens_with_the_project_last_used(tab, projects):
    """The page-load refresh of the project row picks the project last shown, which the dropdown's
    change event notes in the projects root, not the alphabetically first."""
    from lorakit_ext.project import create_project
    from lorakit_ext.webui import ui_inputs

    blocks = tab[0]
    dropdown = by_elem_id(blocks)["lorakit_project"]
    for name in ("anna", "kat", "zoe"):
        create_project(projects / "projects", name)
    (change,) = [i for i, d in enumerate(blocks.dependencies) if dropdown._id in d["targets"] and d["trigger"] == "change"
                 and not d["outputs"]]
    blocks.fns[change].fn("zoe")
    assert (projects / "projects" / ui_inputs.TAB_MEMORY).is_file()
    (load,) = [i for i, d in enumerate(blocks.dependencies) if d["trigger"] == "load" and d["outputs"] == [dropdown._id]]
    update = blocks.fns[load].fn()
    assert update["choices"] == ["anna", "kat", "zoe"] and update["value"] == "zoe"


def test_dedupe_galleries_take_their_height_from_the_stylesheet(tab):
    """A fixed gallery height cut the thumbnails off at the bottom (style.css sizes them instead)."""
    css = (REPO / "style.css").read_text(encoding="utf-8")
    ids = by_elem_id(tab[0])
    for slot in range(5):
        gallery = ids[f"lorakit_cluster_{slot}"]
        assert gallery.height is None and "lorakit_cluster" in gallery.elem_classes
    assert re.search(r"#tab_lorakit \.lorakit_cluster \.grid-wrap \{[^}]*height: auto;[^}]*max-height: none;", css)

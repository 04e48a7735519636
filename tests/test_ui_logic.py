"""The tab's pure logic, without gradio or A1111: the form generated from TrainConfig, the plan
box, report tables, run records and input handling."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lorakit_ext.dataset.curation import apply_tag_ops
from lorakit_ext.dataset.dedupe import Cluster, DedupePlan, Member
from lorakit_ext.dataset.importer import import_files
from lorakit_ext.dataset.tags import TagOps, lint_captions
from lorakit_ext.dataset.trash import list_batches, move_to_removed
from lorakit_ext.errors import UserError
from lorakit_ext.models.families import PRESETS
from lorakit_ext.project import create_project
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train.preflight import real_schedule
from lorakit_ext.train_config import TrainConfig
from lorakit_ext.webui import ui_form, ui_images, ui_inputs, ui_plan, ui_results, ui_tables

REPO = Path(__file__).resolve().parents[1]
WEBUI = REPO / "lorakit_ext" / "webui"


@pytest.fixture
def project(tmp_path):
    return create_project(tmp_path / "projects", "kat3r1na")


def save(path: Path, size=(64, 48), colour=(200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# ---- the Train form ------------------------------------------------------------------------------
def test_every_config_field_gets_one_spec_with_its_label_and_help():
    specs = ui_form.form_specs()
    fields = dataclasses.fields(TrainConfig)
    assert [s.name for s in specs] == [f.name for f in fields]
    for spec, field in zip(specs, fields, strict=True):
        assert spec.label == field.metadata["label"]
        assert spec.info.startswith(field.metadata["help"])
        assert spec.group == field.metadata["group"]
    assert len({s.elem_id for s in specs}) == len(specs)


def test_component_kinds_follow_type_range_and_choices():
    specs = {s.name: s for s in ui_form.form_specs()}
    assert specs["enable_bucket"].kind == "checkbox"
    assert specs["optimizer"].kind == "dropdown" and "AdamW8bit" in specs["optimizer"].choices
    # Int choices travel as strings, which gradio 3 and 4 dropdowns both hold.
    assert specs["max_token_length"].choices == ("75", "150", "225")
    assert specs["resolution"].kind == "slider"
    assert (specs["resolution"].minimum, specs["resolution"].maximum, specs["resolution"].step) == (64, 2048, 64)
    assert specs["clip_skip"].kind == "slider" and specs["clip_skip"].step == 1
    # Too wide for a slider: a number box, its range told in the help text.
    assert specs["num_repeats"].kind == "number" and specs["num_repeats"].precision == 0
    assert specs["num_repeats"].info.endswith("(1–1000)")
    assert specs["unet_lr"].kind == "number" and specs["unet_lr"].precision is None
    assert specs["output_name"].kind == "textbox"


def test_groups_keep_declaration_order():
    groups = ui_form.grouped(ui_form.form_specs())
    assert list(groups) == ["Output", "Dataset", "Steps", "Learning", "Network", "Model"]
    assert sum(len(v) for v in groups.values()) == len(dataclasses.fields(TrainConfig))


def test_form_values_round_trip_to_the_same_config():
    specs = ui_form.form_specs()
    config = TrainConfig(output_name="kat", trigger="kat3r1na", max_token_length=150, unet_lr=3e-4)
    values = ui_form.config_values(specs, config)
    assert ui_form.config_from_values(specs, values) == config


def test_form_values_as_gradio_sends_them_are_coerced():
    specs = ui_form.form_specs()
    values = ui_form.config_values(specs, TrainConfig())
    index = {s.name: i for i, s in enumerate(specs)}
    values[index["num_repeats"]] = 12.0  # gr.Number gives floats
    values[index["max_token_length"]] = "75"
    config = ui_form.config_from_values(specs, values)
    assert config.num_repeats == 12 and isinstance(config.num_repeats, int)
    assert config.max_token_length == 75


def test_an_empty_number_box_is_named_by_its_label():
    specs = ui_form.form_specs()
    values = ui_form.config_values(specs, TrainConfig())
    values[[s.name for s in specs].index("seed")] = None
    with pytest.raises(UserError, match="Seed is empty"):
        ui_form.config_from_values(specs, values)


def test_presets_set_training_options_and_keep_name_and_trigger():
    specs = ui_form.form_specs()
    current = ui_form.config_values(specs, TrainConfig(output_name="kat", trigger="kat3r1na", clip_skip=2, network_dim=32))
    photo = ui_form.config_from_values(specs, ui_form.preset_values(specs, "kohya-colab (photo)", current))
    assert (photo.output_name, photo.trigger) == ("kat", "kat3r1na")
    assert photo.clip_skip == 1 and photo.network_dim == 16  # every other field back to the preset
    colab = ui_form.config_from_values(specs, ui_form.preset_values(specs, ui_form.DEFAULT_PRESET, current))
    assert colab == TrainConfig(output_name="kat", trigger="kat3r1na")
    assert ui_form.DEFAULT_PRESET == next(iter(PRESETS))


# ---- the plan box --------------------------------------------------------------------------------
def test_plan_text_has_the_notebook_lines_and_the_bucketed_count(project):
    for i in range(5):
        save(project.dataset / f"p{i}.png", (512, 768))
    for i in range(4):
        save(project.dataset / f"l{i}.png", (768, 512))
    config = TrainConfig(num_repeats=3, train_batch_size=2, max_train_epochs=4)
    sizes = ui_plan.dataset_sizes(project.dataset)
    text = ui_plan.plan_text(config, sizes)
    lines = text.splitlines()
    assert lines[:3] == [
        "Found 9 images with 3 repeats, equaling 27 steps.",
        "Divide 27 steps by 2 batch size to get 13.5 steps per epoch.",
        "There will be 4 epochs, for around 54 total training steps.",
    ]
    # Two buckets: ceil(15/2) + ceil(12/2) = 14 steps per epoch, as the trainer counts them.
    schedule = real_schedule(config, bucket_plan_for(config, sizes).steps_per_epoch(3, 2))
    assert schedule.steps_per_epoch == 14
    assert f"After bucketing (2 buckets): 14 steps per epoch, 4 epochs, {schedule.total_steps} steps in total" in text


def test_plan_box_counts_further_and_regularisation_folders_and_names_a_bad_line(project):
    for i in range(4):
        save(project.dataset / f"p{i}.png", (512, 768))
    outfits, reg = project.path / "3_outfits", project.path / "reg"
    outfits.mkdir()
    reg.mkdir()
    for i in range(2):
        save(outfits / f"o{i}.png", (512, 768))
    for i in range(3):
        save(reg / f"r{i}.png", (512, 768))
    config = TrainConfig(num_repeats=2, train_batch_size=2, max_train_epochs=1, dataset_folders="3_outfits", reg_folders="1 reg")
    text = ui_plan.plan_text(config, ui_plan.dataset_sizes(project.dataset), project.dataset)
    assert "3_outfits: found 2 images with 3 repeats, equaling 6 steps." in text
    # 4 × 2 + 2 × 3 = 14 training steps, matched by 14 regularisation steps: 28, in batches of 2.
    assert "As kohya does, regularisation is matched to the 14 training steps: 14 regularisation steps" in text
    assert "After bucketing (1 bucket): 14 steps per epoch" in text
    bad = config.replace(reg_folders="1 nowhere")
    assert ui_plan.plan_text(bad, ui_plan.dataset_sizes(project.dataset), project.dataset).startswith(
        f"Problem: regularisation folder {project.path / 'nowhere'} is not a folder")


def test_plan_shows_problems_instead_of_bucketing(project):
    save(project.dataset / "a.png")
    text = ui_plan.plan_text(TrainConfig(resolution=500), ui_plan.dataset_sizes(project.dataset))
    assert "Problem: resolution = 500 is not a multiple of bucket_reso_steps = 64" in text
    assert "After bucketing" not in text
    assert "no images yet" in ui_plan.plan_text(TrainConfig(), [])


def test_dataset_sizes_are_upright_and_cached(project, monkeypatch):
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90°: upright it is 20 × 40
    image.save(project.dataset / "r.jpg", exif=exif)
    assert ui_plan.dataset_sizes(project.dataset) == [(20, 40)]
    import lorakit_ext.train.data as data

    monkeypatch.setattr(data, "image_size", lambda path: pytest.fail("re-read an unchanged image"))
    assert ui_plan.dataset_sizes(project.dataset) == [(20, 40)]


def test_plan_fields_exist():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(ui_plan.PLAN_FIELDS) <= names


# ---- report tables -------------------------------------------------------------------------------
def test_import_rows_give_each_file_and_reason(project, tmp_path):
    good = save(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat", encoding="utf-8")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    report = import_files(project, [good, broken, tmp_path / "cat.txt"])
    rows = ui_tables.import_rows(report)
    assert rows[0][:2] == ["imported", str(good)] and "caption cat.txt" in rows[0][2]
    assert rows[1][0] == "rejected" and rows[1][1] == str(broken) and rows[1][2]
    assert ui_tables.import_summary(report) == "Imported 1 image (1 with captions); rejected 1 file (reasons below)."
    again = import_files(project, [good])
    assert ui_tables.import_rows(again) == [["skipped", str(good), again.skipped[0].reason]]
    assert "already in the dataset as cat.png" in again.skipped[0].reason
    assert ui_tables.import_summary(again) == (
        "Imported 0 images (0 with captions); skipped 1 file already in the dataset or behind a link (listed below).")


def test_batch_rows_newest_first(project):
    for name in ("a.png", "b.png"):
        path = save(project.dataset / name)
        move_to_removed(project, [path], f"test {name}")
    rows = ui_tables.batch_rows(list_batches(project))
    assert [r[3] for r in rows] == ["test b.png", "test a.png"]
    assert rows[0][2] == "1" and rows[0][4] == "removed"


def _plan() -> DedupePlan:
    members = [Member("a.png", 1024, 768, 300_000, 1, 0), Member("a_small.jpg", 512, 384, 40_000, 1, 4)]
    return DedupePlan("phash", 6, 10, [Cluster(1, "a.png", members, [("a.png", "a_small.jpg", 4)])], [("bad.png", "truncated")])


def test_cluster_captions_mark_the_kept_image():
    plan = _plan()
    member = plan.clusters[0].members[0]
    assert ui_tables.member_caption(member, "a.png").startswith(ui_tables.KEEP_MARK)
    assert not ui_tables.member_caption(member, "a_small.jpg").startswith(ui_tables.KEEP_MARK)
    assert (
        ui_tables.cluster_label(plan.clusters[0], "a_small.jpg")
        == "Cluster 1: 2 images up to 4 bits apart, keeping a_small.jpg (★)"
    )


def test_sizes_read_as_bytes_kib_or_mib_and_small_files_are_not_zero():
    assert [ui_tables.file_size(n) for n in (0, 700, 1024, 1536, 300_000, 2**20, 5 * 2**20 + 2**19)] == [
        "0 B", "700 B", "1.0 KiB", "1.5 KiB", "293.0 KiB", "1.0 MiB", "5.5 MiB"
    ]
    tiny = Member("dot.png", 8, 8, 94, 1, 0)
    assert ui_tables.member_caption(tiny, "a.png") == "dot.png · 8×8 · 94 B"


def test_dedupe_summary_counts_moves_picks_and_errors():
    plan = _plan()
    text = ui_tables.dedupe_summary(plan, {})
    assert "1 cluster of near-duplicates among 10 images" in text and "moves 1 image" in text
    assert "bad.png (truncated)" in text
    assert "replaces the suggested keeper in 1 cluster" in ui_tables.dedupe_summary(plan, {1: "a_small.jpg"})
    assert ui_tables.resolved_keep(plan, {1: "a_small.jpg"}) == {1: "a_small.jpg"}
    assert "No near-duplicates" in ui_tables.dedupe_summary(DedupePlan("phash", 6, 3, []), {})


@pytest.mark.parametrize(
    "count, page, expected",
    [(12, 0, (0, 5, 0, 3)), (12, 2, (10, 12, 2, 3)), (12, 9, (10, 12, 2, 3)), (12, -1, (0, 5, 0, 3)), (0, 0, (0, 0, 0, 1))],
)
def test_page_bounds_clamp(count, page, expected):
    assert ui_tables.page_bounds(count, page, 5) == expected


def test_lint_rows_and_summary():
    captions = {"a.png": "", "b.png": "blue eyes", "c.png": "blue eyes, kat", "d.png": "kat, " + ", ".join(["word"] * 80)}
    report = lint_captions(captions, "kat", count_tokens=lambda text: len(text.split(",")))
    rows = ui_tables.lint_rows(report)
    assert ["a.png", "empty caption"] in rows
    assert ["b.png", "missing the trigger 'kat'"] in rows
    assert ["c.png", "trigger not first (tag shuffling would move it)"] in rows
    assert ["d.png", "81 CLIP tokens, over 75"] in rows
    assert ui_tables.lint_summary(report) == "4 captions checked: 4 problems."
    estimated = lint_captions({"x.png": "kat"}, "kat")
    assert ui_tables.lint_summary(estimated) == "1 caption checked: no problems (estimated CLIP token counts)."


def test_change_rows_for_preview_and_apply(project):
    save(project.dataset / "a.png")
    (project.dataset / "a.txt").write_text("b, a, b", encoding="utf-8")
    save(project.dataset / "c.png")
    changes = apply_tag_ops(project, TagOps(dedupe=True, trigger="kat"), dry_run=True)
    assert ui_tables.change_rows(changes) == [["a.png", "b, a, b", "kat, b, a"], ["c.png", "(no caption file)", "kat"]]
    assert (
        ui_tables.change_summary(changes, True) == "Would change 2 caption(s) (1 new caption file(s)): 2 tag(s) added, 1 removed."
    )
    assert ui_tables.change_summary([], False) == "No caption changed."


def test_tag_count_rows():
    assert ui_tables.tag_count_rows([("a", 3), ("b", 1)], top=1) == [["a", 3]]
    assert ui_tables.tag_count_rows([("a", 3), ("b", 1)]) == [["a", 3], ["b", 1]]


# ---- runs, losses, files -------------------------------------------------------------------------
def test_loss_columns():
    assert ui_results.loss_columns([]) is None
    assert ui_results.loss_columns([[1, 0.5], [10, 0.25]]) == {"step": [1, 10], "loss": [0.5, 0.25], "series": ["training"] * 2}
    # Validation losses are a line of their own, at the step their epoch ended.
    both = ui_results.loss_columns([[1, 0.5], [10, 0.25]], [[1, 10, 0.3]])
    assert both == {"step": [1, 10, 10], "loss": [0.5, 0.25, 0.3], "series": ["training", "training", "validation"]}


def test_file_and_sample_rows(tmp_path):
    lora = tmp_path / "kat-01.safetensors"
    lora.write_bytes(b"x" * 2**20)
    assert ui_results.file_rows([lora, tmp_path / "kat-02.safetensors"]) == [
        ["kat-01.safetensors", "1.0 MiB"],
        ["kat-02.safetensors", "gone"],
    ]
    sample = save(tmp_path / "kat-01-sample.png")
    grid = save(tmp_path / "grid.png")
    assert ui_results.sample_items([sample, tmp_path / "gone.png"], grid) == [
        (str(sample), "kat-01-sample"),
        (str(grid), "epoch grid"),
    ]


def _run(project, folder: str, files, trigger="kat3r1na", status="finished"):
    run = project.runs / folder
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": status, "output_name": "kat", "files": [str(f) for f in files]}))
    (run / "config.json").write_text(json.dumps({"trigger": trigger}))
    return run


def test_read_runs_newest_first_with_existing_epochs(project, tmp_path):
    loras = tmp_path / "Lora"
    loras.mkdir()
    files = [loras / f"kat-{e:02d}.safetensors" for e in (1, 2, 10)]
    for f in files[1:]:
        f.write_bytes(b"x")
    _run(project, "20260101-000000-kat", [files[0]])
    _run(project, "20260102-000000-kat", [files[2], files[0], files[1], loras / "other.safetensors"])
    (project.runs / "20260103-000000-crashed").mkdir()
    runs = ui_results.read_runs(project)
    assert [r["id"] for r in runs] == ["20260102-000000-kat", "20260101-000000-kat"]
    assert runs[0]["epochs"] == [files[1], files[2]]  # epoch order; the pruned epoch 1 is gone
    assert runs[0]["trigger"] == "kat3r1na"
    choice = ui_results.run_choice(runs[0])
    assert choice == "20260102-000000-kat · 2 epoch files · finished"
    assert ui_results.find_run(runs, choice) is runs[0]
    with pytest.raises(UserError, match="choose a training run"):
        ui_results.find_run(runs, None)


def test_parse_numbers():
    assert ui_results.parse_numbers("0.5, 1,", float, "weights", "1") == [0.5, 1.0]
    assert ui_results.parse_numbers("", float, "weights", "1") == []
    with pytest.raises(UserError, match="weights 'a' should be numbers"):
        ui_results.parse_numbers("a", float, "weights", "1")


def test_cell_for_prefers_the_preferred_weight_then_any():
    cells = {("kat-01", 1, 0.5): "half", ("kat-01", 1, 1.0): "full", ("no LoRA", 1, 1.0): "base"}
    assert ui_results.cell_for(cells, "kat-01", 1.0) == "full"
    assert ui_results.cell_for(cells, "kat-01", 0.8) == "half"
    assert ui_results.cell_for(cells, "kat-02", 1.0) is None


# ---- inputs ----------------------------------------------------------------------------------------
def test_upload_names_from_gradio_3_and_4():
    gradio3 = SimpleNamespace(name="/tmp/gradio/abc/tmpx1y2", orig_name="/tmp/gradio/abc/Kat Photo.JPG")
    paths, names = ui_inputs.upload_names([gradio3, "/tmp/gradio/def/cat.png"])
    assert paths == ["/tmp/gradio/abc/tmpx1y2", "/tmp/gradio/def/cat.png"]
    assert names == ["Kat Photo.JPG", "cat.png"]
    assert ui_inputs.upload_names(None) == ([], [])


def test_captioner_options_only_pass_the_models_of_the_chosen_captioner():
    form = dict(
        blip_model=" Salesforce/blip ",
        prefix="",
        beams=2.0,
        min_length=10,
        max_length=75,
        wd_model="SmilingWolf/wd",
        threshold=0.3,
        character_threshold=0.85,
        blacklist="",
        ratings=False,
    )
    wd = ui_inputs.captioner_options("Anime tags (WD tagger)", **form)
    assert wd["model"] is None and wd["wd_model"] == "SmilingWolf/wd" and wd["beams"] == 2
    both = ui_inputs.captioner_options("Both (BLIP sentence + WD tags)", **form)
    assert both["model"] == "Salesforce/blip" and both["wd_model"] == "SmilingWolf/wd"
    # The options are exactly the CLI's, so its build_captioner takes them.
    from lorakit_ext.cli.caption import build_captioner

    captioner = build_captioner(SimpleNamespace(captioner="both", **both))
    assert captioner.name == "blip:Salesforce/blip + wd:SmilingWolf/wd"


def test_the_tab_opens_the_project_last_used_not_the_first(tmp_path):
    root = tmp_path / "projects"
    names = [create_project(root, name).name for name in ("anna", "kat3r1na", "zoe")]
    assert ui_inputs.last_project(root, names) == "anna"
    ui_inputs.remember_project(root, "zoe")
    assert ui_inputs.last_project(root, names) == "zoe"
    assert ui_inputs.last_project(root, ["anna", "kat3r1na"]) == "anna"  # zoe was deleted
    assert ui_inputs.last_project(root, []) is None
    (root / ui_inputs.TAB_MEMORY).write_text("{not json", encoding="utf-8")
    assert ui_inputs.last_project(root, names) == "anna"
    ui_inputs.remember_project(tmp_path / "no-root-yet", "kat3r1na")
    assert not (tmp_path / "no-root-yet").exists()


def test_neighbour_wraps_and_recovers():
    names = ["a.png", "b.png", "c.png"]
    assert ui_inputs.neighbour(names, "c.png", 1) == "a.png"
    assert ui_inputs.neighbour(names, "a.png", -1) == "c.png"
    assert ui_inputs.neighbour(names, "gone.png", 1) == "a.png"
    assert ui_inputs.neighbour([], "a.png", 1) is None


# ---- previews --------------------------------------------------------------------------------------
def test_preview_is_upright_small_and_never_fails(tmp_path):
    image = Image.new("RGB", (800, 400), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif)
    thumb = ui_images.preview(tmp_path / "r.jpg", 100)
    assert thumb.size == (50, 100) and thumb.mode == "RGB"
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert ui_images.preview(tmp_path / "bad.png", 64).size == (64, 64)
    assert ui_images.preview(tmp_path / "missing.png", 64).size == (64, 64)


# ---- JS wiring -------------------------------------------------------------------------------------
def test_every_js_function_the_tab_names_is_defined_in_lorakit_js():
    script = (REPO / "javascript" / "lorakit.js").read_text(encoding="utf-8")
    defined = set(re.findall(r"^function (\w+)\(", script, re.M))
    named = {
        name
        for path in WEBUI.glob("ui*.py")
        for name in re.findall(r'ui_shared\.js\("(\w+)"\)', path.read_text(encoding="utf-8"))
    }
    assert named, "no JS hooks found; did the helper's name change?"
    assert named <= defined

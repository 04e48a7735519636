"""``python -m lorakit_ext``'s help and dataset commands start without torch (issue 17): each runs
in a fresh interpreter that reports the heavy libraries it loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.models.families import FAMILIES
from lorakit_ext.models.family_presets import FAMILY_SETTINGS
from lorakit_ext.project import create_project

# Runs ``python -m lorakit_ext`` once per command line given (a JSON list), then prints, as the last
# line of stderr, each one's exit status and the heavy libraries it loaded first.
PROBE = """
import json, runpy, sys
HEAVY = ("torch", "peft", "transformers", "safetensors.torch", "gradio")
report = []
for argv in json.loads(sys.argv[1]):
    sys.argv, before, code = ["lorakit_ext", *argv], set(sys.modules), None
    try:
        runpy.run_module("lorakit_ext", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    report.append({"argv": argv, "exit": code, "heavy": [m for m in HEAVY if m in sys.modules and m not in before]})
print(json.dumps(report), file=sys.stderr)
"""


def run_light(cwd, *argvs: list[str]) -> tuple[list[dict], str]:
    """Each command line's report, and what they printed, from one fresh interpreter in ``cwd``."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.splitlines()[-1]), proc.stdout


def assert_light(report: list[dict]) -> None:
    for entry in report:
        assert entry["exit"] == 0, entry
        assert entry["heavy"] == [], f"{' '.join(entry['argv'])} imported {entry['heavy']}"


@pytest.fixture
def project(tmp_path):
    made = create_project(tmp_path / "root", "kat")
    fill_dataset(made.dataset, count=2)
    # A repeated tag, for tags --dedupe to find.
    (made.dataset / "img0.txt").write_text("kat, smile, smile")
    return made


def test_help_of_every_command_imports_no_torch(tmp_path):
    # Training and sampling commands load torch in their handlers only, never to build the parser.
    commands = ("plan", "project", "import", "tags", "captions", "dedupe", "undo", "train", "queue", "compare", "demo", "caption", "reg-images")
    report, out = run_light(tmp_path, ["--help"], *([command, "--help"] for command in commands))
    assert_light(report)
    assert "import → dedupe → caption" in out and "--preset" in out


def test_bench_lists_its_kinds_though_it_loads_them_only_when_used(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "train benchmark" in capsys.readouterr().out


def test_plan_for_a_number_of_images_imports_no_torch(tmp_path):
    report, out = run_light(tmp_path, ["plan", "--images", "20", "--preset", "UNet only", "--json"])
    assert_light(report)
    assert json.loads(out)["plan"]["total_steps"] == 900


def test_plan_refuses_another_familys_preset_without_torch(tmp_path):
    report, out = run_light(tmp_path, ["plan", "--images", "20", "--preset", "Pony", "--json"])
    assert report[0]["exit"] == 2 and report[0]["heavy"] == []
    assert "is not one of SD1's" in json.loads(out)["error"]


def test_project_create_and_list_import_no_torch(tmp_path):
    root = str(tmp_path / "root")
    report, out = run_light(tmp_path, ["project", "create", "kat", "--root", root], ["project", "list", "--root", root])
    assert_light(report)
    assert (tmp_path / "root" / "kat" / "dataset").is_dir() and out.splitlines()[-1] == "kat"


def test_import_imports_no_torch(tmp_path, project):
    source = tmp_path / "source"
    source.mkdir()
    fill_dataset(source, count=1)
    report, _ = run_light(tmp_path, ["import", project.name, str(source), "--root", str(project.root)])
    assert_light(report)
    assert (project.dataset / "img0.png").is_file()


def test_tags_dry_run_imports_no_torch(tmp_path, project):
    report, out = run_light(tmp_path, ["tags", project.name, "--dedupe", "--dry-run", "--root", str(project.root)])
    assert_light(report)
    assert "+ kat, smile" in out and (project.dataset / "img0.txt").read_text() == "kat, smile, smile"


def test_captions_show_imports_no_torch(tmp_path, project):
    report, out = run_light(tmp_path, ["captions", project.name, "show", "--root", str(project.root)])
    assert_light(report)
    assert "img1.png: kat, red hair, colour 1, smile" in out


def test_dedupe_and_undo_list_import_no_torch(tmp_path, project):
    root = str(project.root)
    report, out = run_light(tmp_path, ["dedupe", project.name, "--root", root], ["undo", project.name, "--list", "--root", root])
    assert_light(report)
    assert "No near-duplicates among 2 images" in out


def test_presets_the_cli_offers_are_the_families_own():
    # The CLI reads the torch-free tables; the families must hold the same ones.
    assert [(s.label, s.presets, dict(s.defaults)) for s in FAMILY_SETTINGS] == [
        (f.label, f.presets, dict(f.defaults)) for f in FAMILIES
    ]


def test_queueing_a_run_and_listing_the_queue_import_no_torch(tmp_path, project):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"checked when the run starts")
    root = str(project.root)
    report, out = run_light(tmp_path, ["queue", "add", project.name, "--root", root, "--base-model", str(model), "--epochs", "3"],
                            ["queue", "list", "--root", root])
    assert_light(report)
    assert out.startswith("queued ") and out.splitlines()[-1].endswith("  queued")


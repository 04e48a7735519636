from __future__ import annotations

import json
import os

import pytest

from lorakit_ext import fsutil
from lorakit_ext.cli import main
from lorakit_ext.dataset.captions import load_captions, read_caption, read_captions, write_caption
from lorakit_ext.dataset.curation import CurationSummary, apply_tag_ops
from lorakit_ext.dataset.tags import TagOps, estimate_clip_tokens, lint_captions
from lorakit_ext.errors import UserError
from lorakit_ext.models.clip_tokenizer import build_clip_tokenizer_files, clip_token_counter
from lorakit_ext.project import create_project

OLD = 1_000_000_000  # an mtime far in the past, so any rewrite shows


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "root", "demo")
    for name in ("a.png", "b.png", "c.jpg"):
        (project.dataset / name).write_bytes(b"image bytes")
    return project


def caption_bytes(project, name):
    return (project.dataset / name).read_bytes()


def test_bom_and_crlf_are_tolerated_without_warning(project):
    (project.dataset / "a.txt").write_bytes("\ufeffkat, smile\r\n".encode("utf-8"))
    read = read_caption(project.dataset / "a.png")
    assert read.text == "kat, smile" and read.warning is None


def test_several_lines_are_joined_into_one_caption_with_a_warning(project):
    (project.dataset / "a.txt").write_bytes(b"kat, smile\r\n\r\nred hair\rsolo\n")
    read = read_caption(project.dataset / "a.png")
    assert read.text == "kat, smile, red hair, solo"
    assert "a.txt has 3 lines" in read.warning


def test_cp1252_and_utf16_captions_are_read_with_a_warning_naming_the_file(project):
    (project.dataset / "a.txt").write_bytes("café, crème brûlée".encode("cp1252"))
    (project.dataset / "b.txt").write_bytes("猫耳, smile".encode("utf-16"))
    a, b = read_caption(project.dataset / "a.png"), read_caption(project.dataset / "b.png")
    assert a.text == "café, crème brûlée" and "a.txt is not UTF-8" in a.warning
    assert b.text == "猫耳, smile" and "b.txt is UTF-16" in b.warning


def test_missing_caption_reads_as_empty(project):
    assert read_caption(project.dataset / "a.png").text == ""
    assert load_captions(project) == {"a.png": "", "b.png": "", "c.jpg": ""}


def test_write_is_one_line_of_utf8_and_round_trips_unicode(project):
    image = project.dataset / "a.png"
    path = write_caption(image, "kat, 猫耳, café\nsecond line\n", project=project)
    assert path == project.dataset / "a.txt"
    assert path.read_bytes() == "kat, 猫耳, café, second line".encode("utf-8")
    assert read_caption(image).text == "kat, 猫耳, café, second line"
    assert sorted(p.name for p in project.dataset.iterdir()) == ["a.png", "a.txt", "b.png", "c.jpg"]


def test_a_failed_write_keeps_the_old_caption_and_leaves_no_temp_file(project, monkeypatch):
    image = project.dataset / "a.png"
    write_caption(image, "kat, smile")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_caption(image, "something else")
    assert caption_bytes(project, "a.txt") == b"kat, smile"
    assert sorted(p.name for p in project.dataset.iterdir()) == ["a.png", "a.txt", "b.png", "c.jpg"]


def test_dot_caption_is_read_when_alone_and_writes_go_to_txt(project):
    (project.dataset / "a.caption").write_text("kat, smile", encoding="utf-8")
    assert read_caption(project.dataset / "a.png").text == "kat, smile"
    write_caption(project.dataset / "a.png", "kat, frown")
    assert caption_bytes(project, "a.caption") == b"kat, smile"
    assert read_caption(project.dataset / "a.png").text == "kat, frown"


def test_a_caption_symlinked_outside_the_project_is_refused(project, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a caption")
    (project.dataset / "a.txt").symlink_to(secret)
    with pytest.raises(UserError, match="outside"):
        read_captions(project)
    with pytest.raises(UserError, match="outside"):
        write_caption(project.dataset / "a.png", "kat", project=project)
    assert secret.read_text() == "not a caption"


def test_batch_apply_rewrites_only_changed_captions(project):
    (project.dataset / "a.txt").write_text("kat, smile", encoding="utf-8")
    (project.dataset / "b.txt").write_bytes(b"smile, smile, 1girl\n")
    for name in ("a.txt", "b.txt"):
        os.utime(project.dataset / name, ns=(OLD, OLD))
    ops = TagOps(dedupe=True, trigger="kat")

    preview = apply_tag_ops(project, ops, dry_run=True)
    assert [c.name for c in preview] == ["b.png", "c.jpg"]
    assert not (project.dataset / "c.txt").exists()
    assert (project.dataset / "b.txt").stat().st_mtime_ns == OLD

    changes = apply_tag_ops(project, ops)
    assert [(c.name, c.before, c.after, c.created) for c in changes] == [
        ("b.png", "smile, smile, 1girl", "kat, smile, 1girl", False),
        ("c.jpg", "", "kat", True),
    ]
    assert caption_bytes(project, "b.txt") == b"kat, smile, 1girl"
    assert caption_bytes(project, "c.txt") == b"kat"
    assert caption_bytes(project, "a.txt") == b"kat, smile"
    assert (project.dataset / "a.txt").stat().st_mtime_ns == OLD
    summary = CurationSummary.of(changes)
    assert (summary.changed, summary.created, summary.tags_added, summary.tags_removed) == (2, 1, 2, 1)
    assert apply_tag_ops(project, ops) == []


def test_batch_apply_needs_an_operation(project):
    with pytest.raises(UserError, match="no tag operation"):
        apply_tag_ops(project, TagOps())


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = build_clip_tokenizer_files(tmp_path_factory.mktemp("clip"))
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_offline_clip_tokenizer_gives_the_real_sd15_ids(clip_tokenizer):
    assert len(clip_tokenizer) == 49408 and clip_tokenizer.model_max_length == 77
    assert clip_tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_token_counter(clip_tokenizer)("a photo of a cat") == 5


SAMPLES = [
    "1girl, solo, long hair, looking at viewer, smile, open mouth, blue eyes, blonde hair, shirt, "
    "long sleeves, dress, bow, holding, jewelry, sitting, closed mouth, standing, full body, flower",
    "a woman with long brown hair wearing a red dress and standing in front of a brick wall",
    "hatsune miku, twintails, aqua hair, detached sleeves, necktie, zettai ryouiki, absurdres",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k wallpaper, cinematic lighting, bokeh",
    "café au lait, 東方, 猫耳, kemonomimi mode",
    "souryuu asuka langley, neon genesis evangelion, plugsuit, interface headset, red bodysuit",
    "there is a man sitting on a bench with a dog, photorealistic, 35mm, f/1.8, kodak portra 400",
]


def test_estimate_stays_close_to_the_real_count_and_errs_high_overall(clip_tokenizer):
    count = clip_token_counter(clip_tokenizer)
    pairs = [(count(text), estimate_clip_tokens(text)) for text in SAMPLES]
    for exact, estimate in pairs:
        assert exact * 0.9 <= estimate <= exact * 1.3 + 2, (exact, estimate)
    assert sum(e for _, e in pairs) >= sum(x for x, _ in pairs)


def test_lint_with_the_real_tokenizer_reports_exact_counts(clip_tokenizer):
    long = ", ".join(["long hair"] * 30)
    captions = {"a.png": "kat, smile", "b.png": long}
    exact = lint_captions(captions, "kat", clip_token_counter(clip_tokenizer))
    assert exact.too_long == [("b.png", 89)]  # 30 × (long, hair) + 29 commas
    assert exact.missing_trigger == ["b.png"] and exact.token_count_exact
    assert "estimate" not in exact.text()
    estimated = lint_captions(captions, "kat")
    assert [n for n, _ in estimated.too_long] == ["b.png"] and "estimate" in estimated.text()


def cli(capsys, project, *argv):
    code = main([*argv, "--root", str(project.root)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_show_set_and_json(project, capsys):
    code, out, _ = cli(capsys, project, "captions", "demo", "set", "a.png", "kat, 猫耳")
    assert code == 0 and "wrote a.txt" in out
    assert caption_bytes(project, "a.txt") == "kat, 猫耳".encode("utf-8")
    (project.dataset / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, out, _ = cli(capsys, project, "captions", "demo")
    assert code == 0
    assert out.splitlines()[:3] == ["a.png: kat, 猫耳", "b.png: café", "c.jpg: (no caption)"]
    assert "warning: b.txt is not UTF-8" in out
    code, out, _ = cli(capsys, project, "captions", "demo", "show", "--json")
    data = json.loads(out)
    assert data["ok"] and data["captions"] == {"a.png": "kat, 猫耳", "b.png": "café", "c.jpg": ""}


@pytest.mark.parametrize(
    "argv, message",
    [
        (("set", "../x.png", "text"), "not a plain file name"),
        (("set", "missing.png", "text"), "no image 'missing.png'"),
        (("set", "a.png"), "set takes 2 value(s), got 1"),
        (("show", "--trigger", "kat"), "only used by lint"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(project, capsys, argv, message):
    code, out, err = cli(capsys, project, "captions", "demo", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in project.root.rglob("*.txt")) == []


def test_cli_lint_fails_until_tags_fix_the_trigger(project, capsys):
    write_caption(project.dataset / "a.png", "smile, kat")
    code, out, _ = cli(capsys, project, "captions", "demo", "lint", "--trigger", "kat")
    assert code == 1
    assert "empty captions (2): b.png, c.jpg" in out
    assert "trigger not at the start, so tag shuffling moves it (1): a.png" in out
    code, out, _ = cli(capsys, project, "tags", "demo", "--trigger", "kat", "--dry-run")
    assert code == 0 and "would change 3 caption(s)" in out and "  + kat, smile" in out
    assert caption_bytes(project, "a.txt") == b"smile, kat"
    code, out, _ = cli(capsys, project, "tags", "demo", "--trigger", "kat", "--json")
    data = json.loads(out)
    assert data["summary"]["changed"] == 3 and data["changes"][0]["after"] == "kat, smile"
    code, out, _ = cli(capsys, project, "captions", "demo", "lint", "--trigger", "kat", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["token_count_exact"] is True


def test_cli_tags_counts_and_search_replace(project, capsys):
    write_caption(project.dataset / "a.png", "hat, witch, smile")
    write_caption(project.dataset / "b.png", "hat, smile")
    code, out, _ = cli(capsys, project, "tags", "demo")
    assert code == 0 and out.splitlines()[:2] == ["3 distinct tags in 3 captions:", "    2  hat"]
    code, out, _ = cli(
        capsys, project, "tags", "demo", "--search", "hat,witch", "--replace", "witch hat", "--mode", "AND", "--counts", "1"
    )
    assert code == 0 and "a.png: smile, witch hat" in out and out.rstrip().endswith("2  smile")
    assert caption_bytes(project, "b.txt") == b"hat, smile"
    code, _, err = cli(capsys, project, "tags", "demo", "--replace", "x")
    assert code == 2 and "without search tags" in err


@pytest.mark.parametrize(
    "before, after",
    [
        (["captions", "demo", "set", "--json", "--root", "ROOT"], ["a.png", "kat, smile"]),
        (["captions", "demo", "--json", "set", "--root", "ROOT", "a.png"], ["kat, smile"]),
        (["captions", "--root", "ROOT", "demo", "set", "a.png", "--json"], ["kat, smile"]),
        (["captions", "demo", "set", "a.png", "kat, smile"], ["--root", "ROOT", "--json"]),
    ],
)
def test_cli_common_options_work_anywhere_in_set(project, capsys, before, after):
    argv = [str(project.root) if arg == "ROOT" else arg for arg in before + after]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["caption"] == "kat, smile"
    assert caption_bytes(project, "a.txt") == b"kat, smile"


@pytest.mark.parametrize("action", [["show"], ["lint", "--trigger", "kat"]])
def test_cli_common_options_work_after_show_and_lint(project, capsys, action):
    write_caption(project.dataset / "a.png", "kat, smile")
    main(["captions", "demo", action[0], "--json", "--root", str(project.root), *action[1:]])
    data = json.loads(capsys.readouterr().out)
    assert data["captions"] == ({"a.png": "kat, smile", "b.png": "", "c.jpg": ""} if action == ["show"] else 3)

"""Captioning: modes, resume, crashes, out-of-memory, tag rules, and tiny real BLIP/WD models loaded
through the real loaders (random weights, built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorakit_ext.caption import runner
from lorakit_ext.caption.blip import BlipCaptioner
from lorakit_ext.caption.merge import MergedCaptioner, merge_captions
from lorakit_ext.caption.runner import JOURNAL, caption_project
from lorakit_ext.caption.wd import CHARACTER, GENERAL, RATING, WdTagger, preprocess, select_tags
from lorakit_ext.cli import main
from lorakit_ext.dataset.captions import caption_path
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project
from lorakit_ext.train.events import Interrupted

torch.set_num_threads(1)
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


class Fake:
    """A captioner that returns ``text(image_index, call)`` and can fail on chosen calls."""

    def __init__(self, text=lambda i, call: "red hair, smile", fail=None, name="fake"):
        self.name, self.text, self.fail = name, text, fail
        self.calls, self.loaded, self.unloads = [], False, 0

    def load(self, device, dtype):
        self.loaded = True

    def caption(self, images):
        call = len(self.calls)
        self.calls.append(len(images))
        if self.fail is not None:
            error = self.fail(call, len(images))
            if error is not None:
                raise error
        return [self.text(image.getpixel((0, 0))[0], call) for image in images]

    def unload(self):
        self.loaded = False
        self.unloads += 1


def make_project(root: Path, n: int = 6, name: str = "p"):
    project = create_project(root, name)
    for i in range(n):
        # The red channel carries the index, so a fake captioner knows which image it sees.
        Image.new("RGB", (24 + i, 16), (i, 100, 200)).save(project.dataset / f"img_{i:02d}.png")
    return project


def caption_of(project, i: int) -> str | None:
    path = caption_path(project.dataset / f"img_{i:02d}.png")
    return path.read_text(encoding="utf-8") if path.exists() else None


# ---- modes -------------------------------------------------------------------------------------
def test_missing_mode_never_touches_an_existing_caption(tmp_path):
    project = make_project(tmp_path, 4)
    caption_path(project.dataset / "img_00.png").write_bytes(b"my own words, kept\r\n")
    caption_path(project.dataset / "img_01.png").write_text("  \n", encoding="utf-8")
    seen = []
    report = caption_project(project, Fake(), batch_size=2, on_progress=seen.append, device="cpu")
    assert caption_path(project.dataset / "img_00.png").read_bytes() == b"my own words, kept\r\n"
    assert [caption_of(project, i) for i in (1, 2, 3)] == ["red hair, smile"] * 3
    assert report.already_captioned == 1 and sorted(report.written) == ["img_01.png", "img_02.png", "img_03.png"]
    assert {p.phase for p in seen} == {"captioning"} and seen[-1].step == seen[-1].total_steps == 3
    # Run again: everything has a caption now, nothing is loaded or written.
    again = Fake()
    assert caption_project(project, again, device="cpu").written == [] and again.calls == []


def test_prepend_and_append_add_only_tags_the_caption_lacks(tmp_path):
    project = make_project(tmp_path, 2)
    for i in range(2):
        caption_path(project.dataset / f"img_{i:02d}.png").write_text("1girl, Smile", encoding="utf-8")
    caption_project(project, Fake(lambda i, c: "smile, red hair" if i == 0 else ""), mode="prepend", device="cpu")
    assert caption_of(project, 0) == "red hair, 1girl, Smile"
    report = caption_project(project, Fake(lambda i, c: "blue eyes, RED HAIR"), mode="append", device="cpu")
    assert caption_of(project, 0) == "red hair, 1girl, Smile, blue eyes"
    assert caption_of(project, 1) == "1girl, Smile, blue eyes, RED HAIR"
    again = caption_project(project, Fake(lambda i, c: "blue eyes, RED HAIR"), mode="append", device="cpu")
    assert again.written == [] and sorted(again.unchanged) == ["img_00.png", "img_01.png"]
    assert report.empty == [] and not (project.runs / JOURNAL).exists()


def test_overwrite_replaces_but_never_with_nothing(tmp_path):
    project = make_project(tmp_path, 2)
    for i in range(2):
        caption_path(project.dataset / f"img_{i:02d}.png").write_text("old", encoding="utf-8")
    report = caption_project(project, Fake(lambda i, c: "new, new, tag" if i == 0 else " "), mode="overwrite", device="cpu")
    assert caption_of(project, 0) == "new, tag" and caption_of(project, 1) == "old"
    assert report.empty == ["img_01.png"]


# ---- resume, crashes, out of memory --------------------------------------------------------------
def unique_tag(i, call):
    # A different tag on every call: only the journal can keep a resumed run from prepending twice.
    return f"tag{call}_{i}"


def test_interrupted_prepend_resumes_without_prepending_twice(tmp_path):
    project = make_project(tmp_path, 6)
    for i in range(6):
        caption_path(project.dataset / f"img_{i:02d}.png").write_text("mine", encoding="utf-8")
    fake = Fake(unique_tag)
    with pytest.raises(Interrupted, match="2 of 6"):
        caption_project(project, fake, mode="prepend", batch_size=2, should_stop=lambda: bool(fake.calls), device="cpu")
    assert fake.calls == [2] and fake.unloads == 1 and (project.runs / JOURNAL).exists()
    report = caption_project(project, Fake(unique_tag), mode="prepend", batch_size=2, device="cpu")
    assert report.resumed == 2 and len(report.written) == 4
    for i in range(6):
        tags = caption_of(project, i).split(", ")
        assert tags[-1] == "mine" and len(tags) == 2, tags
    assert not (project.runs / JOURNAL).exists()


def test_crash_while_writing_a_batch_is_finished_by_the_next_run(tmp_path, monkeypatch):
    project = make_project(tmp_path, 4)
    for i in range(4):
        caption_path(project.dataset / f"img_{i:02d}.png").write_text("mine", encoding="utf-8")
    real_write, writes = runner.write_caption, []

    def dying_write(image, text, project=None):
        if len(writes) == 3:
            raise OSError("disk vanished")
        writes.append(image.name)
        return real_write(image, text, project=project)

    monkeypatch.setattr(runner, "write_caption", dying_write)
    with pytest.raises(OSError):
        caption_project(project, Fake(unique_tag), mode="prepend", batch_size=2, device="cpu")
    monkeypatch.setattr(runner, "write_caption", real_write)
    caption_project(project, Fake(unique_tag), mode="prepend", batch_size=2, device="cpu")
    assert [len(caption_of(project, i).split(", ")) for i in range(4)] == [2, 2, 2, 2]


def test_captioner_failing_in_batch_two_leaves_batch_one_written(tmp_path):
    project = make_project(tmp_path, 6)
    fake = Fake(fail=lambda call, n: ValueError("model broke") if call == 1 else None)
    with pytest.raises(ValueError):
        caption_project(project, fake, batch_size=2, device="cpu")
    assert [caption_of(project, i) is not None for i in range(6)] == [True, True, False, False, False, False]
    assert fake.unloads == 1 and not fake.loaded
    assert sorted(p.name for p in project.dataset.iterdir() if p.suffix == ".txt") == ["img_00.txt", "img_01.txt"]
    assert not [p for p in project.dataset.iterdir() if p.name.endswith(".tmp")]


def test_out_of_memory_halves_the_batch_once_and_finishes(tmp_path):
    project = make_project(tmp_path, 6)
    fake = Fake(fail=lambda call, n: RuntimeError(OOM) if n > 2 else None)
    report = caption_project(project, fake, batch_size=4, device="cpu")
    assert fake.calls == [4, 2, 2, 2] and report.batch_size == 2
    assert all(caption_of(project, i) == "red hair, smile" for i in range(6))


def test_out_of_memory_after_halving_stops_with_a_message_and_keeps_what_was_written(tmp_path):
    project = make_project(tmp_path, 8)
    fake = Fake(fail=lambda call, n: torch.cuda.OutOfMemoryError(OOM) if call > 0 else None)
    with pytest.raises(UserError, match="batch size 2 \\(already halved from 4\\)"):
        caption_project(project, fake, batch_size=4, device="cpu")
    assert fake.calls == [4, 4, 2] and fake.unloads == 1
    assert [caption_of(project, i) is not None for i in range(8)] == [True] * 4 + [False] * 4


def test_unreadable_image_is_skipped_and_listed(tmp_path):
    project = make_project(tmp_path, 3)
    (project.dataset / "img_01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = caption_project(project, Fake(), device="cpu")
    assert list(report.unreadable) == ["img_01.png"] and "img_01.png" in report.text()
    assert caption_of(project, 1) is None and caption_of(project, 0) == caption_of(project, 2) == "red hair, smile"


# ---- WD tag rules ---------------------------------------------------------------------------------
NAMES = ["general", "sensitive", "long_hair", "^_^", "(o)_(o)", "hat", "smile", "ganyu_(genshin_impact)", "other_girl", "black_hair"]
CATS = [RATING, RATING, GENERAL, GENERAL, GENERAL, GENERAL, GENERAL, CHARACTER, CHARACTER, GENERAL]
PROBS = [0.70, 0.20, 0.95, 0.60, 0.50, 0.30, 0.36, 0.90, 0.80, 0.40]


def test_select_tags_thresholds_order_and_underscores():
    tags = select_tags(PROBS, NAMES, CATS, 0.35, 0.85)
    assert tags == ["long hair", "ganyu (genshin impact)", "^_^", "(o)_(o)", "black hair", "smile"]
    assert select_tags(PROBS, NAMES, CATS, 0.55, 0.75) == ["long hair", "ganyu (genshin impact)", "other girl", "^_^"]


def test_select_tags_blacklist_and_ratings():
    tags = select_tags(PROBS, NAMES, CATS, 0.35, 0.85, blacklist=["Long Hair", "black_hair"], include_ratings=True)
    assert tags == ["ganyu (genshin impact)", "general", "^_^", "(o)_(o)", "smile"]


def test_wd_preprocessing_pads_on_white_and_feeds_bgr():
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    cfg = {"input_size": [3, 8, 8], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    x = preprocess([red], cfg)
    assert x.shape == (1, 3, 8, 8)
    middle, top = x[0, :, 4, 4].tolist(), x[0, :, 0, 4].tolist()
    assert middle == pytest.approx([-1.0, -1.0, 1.0], abs=0.02)  # blue, green, red
    assert top == pytest.approx([1.0, 1.0, 1.0])  # the white padding


# ---- merge ----------------------------------------------------------------------------------------
def test_both_merges_two_captioners_without_duplicates(tmp_path):
    assert merge_captions("a woman in a red hat", "Red Hat, smile, red hat", "smile") == "a woman in a red hat, Red Hat, smile"
    project = make_project(tmp_path, 2)
    blip, tags = Fake(lambda i, c: "a woman in a hat", name="b"), Fake(lambda i, c: "hat, smile", name="t")
    both = MergedCaptioner(blip, tags)
    caption_project(project, both, device="cpu")
    assert caption_of(project, 0) == "a woman in a hat, hat, smile" and both.name == "b + t"
    assert blip.unloads == tags.unloads == 1


# ---- tiny real models -----------------------------------------------------------------------------
WORDS = ["a", "photograph", "of", "cat", "dog", "red", "hat", "sitting", "on", "the", "grass"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from transformers import BlipConfig, BlipForConditionalGeneration

    from lorakit_ext.bench.caption import synthetic_blip_processor

    folder = tmp_path_factory.mktemp("tiny-blip")
    processor = synthetic_blip_processor(folder, 64, 32, WORDS)
    tok = processor.tokenizer
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**small, "vocab_size": 64, "max_position_embeddings": 64, "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
            "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config={**small, "image_size": 32, "patch_size": 16}, projection_dim=16, image_text_hidden_size=16)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_loads_from_a_folder_and_batching_does_not_change_captions(tiny_blip):
    images = [Image.new("RGB", (40, 30), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    blip = BlipCaptioner(str(tiny_blip), prefix="A  Photograph of", min_length=5, max_length=8)
    blip.load(torch.device("cpu"), torch.float32)
    batched = blip.caption(images)
    single = [blip.caption([image])[0] for image in images]
    blip.unload()
    assert batched == single
    for caption in batched:
        words = caption.split()
        assert 1 <= len(words) <= 4  # 8 tokens minus [DEC] and the 3 prefix words
        assert not caption.startswith("a photograph of") and "[" not in caption


def test_missing_model_says_how_to_place_it(tmp_path):
    with pytest.raises(UserError) as blip_error:
        BlipCaptioner("nobody-here/no-such-blip").load(torch.device("cpu"), torch.float32)
    message = str(blip_error.value)
    assert "nobody-here/no-such-blip" in message and "offline" in message
    assert "huggingface-cli download nobody-here/no-such-blip --local-dir" in message and "--model" in message
    with pytest.raises(UserError, match="--wd-model"):
        WdTagger("hf-hub:nobody-here/no-such-tagger").load(torch.device("cpu"), torch.float32)
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="lacks config.json, model.safetensors, selected_tags.csv"):
        WdTagger(str(tmp_path / "wd")).load(torch.device("cpu"), torch.float32)


WD_LOGITS = {"long_hair": 3.0, "ganyu_(genshin_impact)": 2.5, "general": 2.0, "^_^": 1.0, "smile": 0.0, "sensitive": -1.0, "hat": -2.0}


@pytest.fixture(scope="module")
def tiny_wd(tmp_path_factory):
    from safetensors.torch import save_file

    from lorakit_ext.caption.wd import build_model

    folder = tmp_path_factory.mktemp("tiny-wd")
    names = list(WD_LOGITS)
    cats = {"general": RATING, "sensitive": RATING, "ganyu_(genshin_impact)": CHARACTER}
    args = {"img_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 2, "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"}
    config = {"architecture": "vit_base_patch16_224", "num_classes": len(names), "model_args": args}
    model = build_model(config)
    # The head ignores the image: the test knows every probability the tagger will see.
    torch.nn.init.zeros_(model.head.weight)
    model.head.bias.data = torch.tensor([WD_LOGITS[n] for n in names])
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    config["pretrained_cfg"] = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{cats.get(n, GENERAL)},{100 - i}" for i, n in enumerate(names)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_wd_tagger_end_to_end_through_the_cli(tmp_path, tiny_wd, capsys):
    make_project(tmp_path, 3)
    argv = ["caption", "p", "--root", str(tmp_path), "--captioner", "wd", "--wd-model", str(tiny_wd), "--device", "cpu"]
    assert main([*argv, "--json", "--blacklist", "SMILE", "--ratings"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["status"] == "done" and len(out["written"]) == 3
    assert out["captioner"] == f"wd:{tiny_wd}"
    project_dir = tmp_path / "p" / "dataset"
    assert (project_dir / "img_00.txt").read_text(encoding="utf-8") == "long hair, ganyu (genshin impact), general, ^_^"
    assert main([*argv, "--mode", "append", "--threshold", "0.6"]) == 0
    captured = capsys.readouterr()
    assert "wrote 0 of 3 captions" in captured.out and "left as they were, nothing new" in captured.out
    assert "captioned 3/3 images" in captured.err


def test_blip_through_the_cli_and_option_mistakes(tmp_path, tiny_blip, capsys):
    make_project(tmp_path, 2)
    argv = ["caption", "p", "--root", str(tmp_path), "--device", "cpu", "--json"]
    assert main([*argv, "--captioner", "blip", "--model", str(tiny_blip), "--min-length", "3", "--max-length", "6", "--beams", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch_size"] == 8 and sorted(out["written"]) == ["img_00.png", "img_01.png"]
    assert (tmp_path / "p" / "dataset" / "img_00.txt").read_text(encoding="utf-8").strip()
    assert main([*argv, "--captioner", "wd", "--model", str(tiny_blip)]) == 2
    assert "--wd-model" in json.loads(capsys.readouterr().out)["error"]
    assert main([*argv, "--captioner", "blip", "--min-length", "9", "--max-length", "5"]) == 2


def test_caption_typed_while_a_batch_runs_is_kept(tmp_path):
    project = make_project(tmp_path, 2)

    def user_types(i, call):
        caption_path(project.dataset / "img_01.png").write_text("typed meanwhile", encoding="utf-8")
        return "generated"

    report = caption_project(project, Fake(user_types), device="cpu")
    assert caption_of(project, 0) == "generated" and caption_of(project, 1) == "typed meanwhile"
    assert report.unchanged == ["img_01.png"]

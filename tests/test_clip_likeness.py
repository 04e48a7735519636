"""CLIP likeness: found only where a CLIP model already is (never downloaded), loaded from a full
CLIP checkpoint as the Hugging Face cache holds SD1's, and scoring a cell that is a training image
1.0 and others less; ``compare --clip-likeness`` adds the column or refuses before drawing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_compare_cli import trained  # noqa: F401 - the fixture
from test_webui_unit import a1111  # noqa: F401 - A1111's modules stood in for

from lorakit_ext.cli import main
from lorakit_ext.compare.clip_likeness import CLIP_HUB_ID, ClipEmbedder, clip_likeness, local_clip_model
from lorakit_ext.compare.epoch_metrics import measure_epochs
from lorakit_ext.compare.epoch_report import report_lines


def _tiny_clip(folder: Path) -> Path:
    """A random full CLIP (text and image towers, as openai/clip-vit-large-patch14's file) at tiny widths."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return _tiny_clip(tmp_path_factory.mktemp("clip"))


def _picture(colour, shape: int) -> Image.Image:
    image = Image.new("RGB", (48, 64), colour)
    ImageDraw.Draw(image).ellipse([4 + shape, 4, 30 + shape, 50], fill=(250, 250, 250))
    return image


def test_a_cached_clip_is_found_and_a_missing_one_is_not_fetched(tmp_path, monkeypatch, tiny_clip):
    from huggingface_hub import constants

    monkeypatch.delenv("LORAKIT_CLIP_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert local_clip_model() is None
    repo = cache / f"models--{CLIP_HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text((tiny_clip / "config.json").read_text())
    assert local_clip_model() is None  # a config without weights (a tokenizer-only download) is not a model
    (snapshot / "model.safetensors").write_bytes((tiny_clip / "model.safetensors").read_bytes())
    assert local_clip_model() == str(snapshot)
    monkeypatch.setenv("LORAKIT_CLIP_MODEL", str(tmp_path / "nowhere"))
    assert local_clip_model() is None
    monkeypatch.setenv("LORAKIT_CLIP_MODEL", str(tiny_clip))
    assert local_clip_model() == str(tiny_clip)


def test_a_cell_that_is_a_training_image_scores_one_and_others_less(tiny_clip):
    embed = ClipEmbedder(str(tiny_clip))
    training = [_picture((200, 30, 30), 0), _picture((30, 60, 200), 10)]
    others = [_picture((20, 200, 40), 5), Image.new("RGB", (64, 64), (0, 0, 0))]
    scores = clip_likeness({"same": training, "other": others}, training, embed)
    assert scores["same"] == pytest.approx(1.0, abs=1e-5)
    assert scores["other"] < scores["same"] - 1e-3
    cells = {("base", 1, 1.0): others[1], ("kat-01", 1, 1.0): training[0], ("kat-02", 1, 1.0): others[0]}
    measured = {m.label: m for m in measure_epochs(cells, "base", training, embed)}
    assert measured["kat-01"].clip_likeness == pytest.approx(1.0, abs=1e-5) and measured["kat-02"].clip_likeness < 0.999
    assert all(m.clip_likeness is None for m in measure_epochs(cells, "base", training))


def test_compare_adds_the_clip_column_or_refuses_before_drawing(trained, tiny_clip, tmp_path, monkeypatch, capsys):  # noqa: F811
    from huggingface_hub import constants

    project, out = trained
    args = ["compare", "kat", "--root", str(project.root), "--size", "64", "--steps", "2", "--seeds", "1", "--clip-likeness"]
    monkeypatch.delenv("LORAKIT_CLIP_MODEL", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(args) == 2
    assert "found no CLIP model" in capsys.readouterr().err
    assert not (Path(out["run_dir"]) / "grid.png").exists()
    monkeypatch.setenv("LORAKIT_CLIP_MODEL", str(tiny_clip))
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(0 < row["clip_likeness"] <= 1.0 + 1e-6 for row in report["epochs"])
    assert "CLIP" in report_lines(report)[0]


def test_the_tab_measures_clip_likeness_only_when_settings_ask_and_a_model_is_here(a1111, tiny_clip, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    from lorakit_ext.webui.suggestion import _clip_embedder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LORAKIT_CLIP_MODEL", str(tiny_clip))
    assert _clip_embedder() is None  # off by default
    a1111.shared.opts.data["lorakit_clip_likeness"] = True
    embed = _clip_embedder()
    assert isinstance(embed, ClipEmbedder) and embed.device.type == "cpu"
    embed.release()
    monkeypatch.delenv("LORAKIT_CLIP_MODEL")
    assert _clip_embedder() is None  # asked for, but none on this machine: skipped, nothing fetched

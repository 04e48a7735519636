"""``bench train --family sdxl``: our rows on a random SDXL, and kohya's ``sdxl_train_network.py``
handed the same settings, a random SDXL checkpoint in A1111's layout and both SDXL tokenizers.
The model tests need sgm (``LORAKIT_SGM_DIR``; see ``tests/tiny_sdxl.py``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch
from test_bench_train import stand_in_sd_scripts
from tiny_sdxl import sgm_dir

import lorakit_ext.bench.train as bench_train
from lorakit_ext.bench.kohya import write_tokenizers
from lorakit_ext.bench.models import FAMILIES
from lorakit_ext.cli import main

TINY_SDXL = ["bench", "train", "--family", "sdxl", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "1",
             "--modes", "eager", "--images", "8", "--resolution", "64", "--json"]


def test_sdxl_rows_train_the_unet_on_cached_text_encoder_outputs(capsys):
    sgm_dir()
    assert main(TINY_SDXL) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "sdxl" and data["model"] == "tiny SDXL layout" and data["kohya_script"] == "sdxl_train_network.py"
    (row,) = data["rows"]
    assert row["train"] == "UNet only" and row["text_encoder_outputs_cached"] is True and row["batch"] == 1
    assert row["it_per_s"] > 0 and row["start_to_first_step_s"] > 0 and math.isfinite(row["final_loss"])
    assert "kohya_it_per_s" not in row, "no recorded kohya SDXL figures stand in for a same-run comparison"


def _skip_our_rows(sd_model, project, args, spec, *, device, kohya, world):
    """Our side of a row, not run: these tests look at what kohya was handed."""
    return {"weights": spec.weights, "mode": spec.mode, "notes": [], "train": spec.train, "text_encoder_outputs_cached": True,
            "gradient_checkpointing": spec.checkpointing, "channels_last": spec.layout, "compiled_blocks": spec.compiled,
            "batch": spec.batch, "precision": "bf16",
            "out_of_memory": False, "it_per_s": 1.0, "images_per_s": float(spec.batch), "graph_warmup_s": [], "kohya_record": kohya}


def test_kohya_sdxl_rows_get_the_sdxl_script_settings_and_tokenizers(tmp_path, monkeypatch, capsys):
    folder, report = stand_in_sd_scripts(tmp_path, monkeypatch, "sdxl")
    # The full-size model our rows would train is never built: only kohya's side runs.
    monkeypatch.setitem(FAMILIES, "sdxl", dataclasses.replace(FAMILIES["sdxl"], build=lambda device, dtype, full: torch.nn.Linear(1, 1)))
    monkeypatch.setattr(bench_train, "_measure", _skip_our_rows)
    args = ["bench", "train", "--family", "sdxl", "--device", "cpu", "--images", "8", "--steps", "2", "--warmup", "1",
            "--gradient-checkpointing", "off,on", "--kohya-sd-scripts", str(folder), "--kohya-python", sys.executable, "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["kohya_record"]["name"] for r in data["rows"]] == ["unet_b1", "unet_b1_gc", "unet_b4", "unet_b4_gc"]
    seen = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(seen) == 4
    for one, checkpointing in zip(seen, (False, True, False, True)):
        train = one["train"]
        assert one["script"] == "sdxl_train_network.py" and one["model_exists"] and one["images"] == 8
        assert one["tokenizers"] == ["laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "openai_clip-vit-large-patch14"]
        assert train["cache_text_encoder_outputs"] is True and train["network_train_unet_only"] is True
        assert "text_encoder_lr" not in train and train["gradient_checkpointing"] is checkpointing
        assert (train["network_dim"], train["network_alpha"], train["sdpa"], train["cache_latents"]) == (16, 8.0, True, True)
        assert one["general"]["resolution"] == 1024 and one["general"]["shuffle_caption"] is False
    assert [one["train"]["train_batch_size"] for one in seen] == [1, 1, 4, 4]


def test_sdxl_tokenizers_load_where_sd_scripts_looks_with_bigg_padding(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizers(tmp_path, FAMILIES["sdxl"])
    clip_l = CLIPTokenizer.from_pretrained(str(tmp_path / "openai_clip-vit-large-patch14"))
    big_g = CLIPTokenizer.from_pretrained(str(tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_l("a photo of a cat").input_ids == ids and big_g("a photo of a cat").input_ids == ids
    # sd-scripts sets bigG's pad id to 0 itself; the folder already says so, as open_clip pads.
    assert big_g.pad_token == "!" and big_g.pad_token_id == 0 and clip_l.pad_token_id == 49407


def test_the_checkpoint_kohya_loads_has_a1111s_sdxl_layout(tmp_path):
    import safetensors.torch

    from lorakit_ext.models.checkpoint import family_of_checkpoint
    from lorakit_ext.models.tiny_sdxl import write_random_sdxl

    sgm_dir()
    assert FAMILIES["sdxl"].write_checkpoint is write_random_sdxl
    path = write_random_sdxl(tmp_path / "sdxl.safetensors", full=False)
    tensors = safetensors.torch.load_file(str(path))
    assert family_of_checkpoint(path).name == "sdxl"
    for key in ("conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight"):
        assert key in tensors, key
    prefixes = {k.split(".")[0] for k in tensors} | {".".join(k.split(".")[:3]) for k in tensors if k.startswith("conditioner.")}
    assert prefixes == {"model", "conditioner", "first_stage_model", "conditioner.embedders.0", "conditioner.embedders.1"}
    floats = [t for t in tensors.values() if t.is_floating_point()]
    assert all(t.dtype == torch.float16 for t in floats)
    assert all(torch.isfinite(t).all() for t in floats), "random init, not uninitialised memory"
    assert tensors["model.diffusion_model.out.2.weight"].abs().sum() > 0, "sgm's zero-initialised output conv gets weights"


@pytest.mark.skipif(not os.environ.get("LORAKIT_SD_SCRIPTS"), reason="LORAKIT_SD_SCRIPTS (an sd-scripts checkout) not set")
def test_real_sdxl_train_network_trains_a_few_steps(capsys):
    """kohya's own sdxl_train_network.py on the driver's random full-size SDXL, dataset and TOML pair
    (each side holds the full-size model in fp32 for a while: some 15 GB of RAM apiece, and many
    minutes on a CPU)."""
    sgm_dir()
    python = os.environ.get("LORAKIT_SD_SCRIPTS_PYTHON", sys.executable)
    args = TINY_SDXL + ["--steps", "3", "--warmup", "2", "--kohya-sd-scripts", os.environ["LORAKIT_SD_SCRIPTS"], "--kohya-python", python]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["kohya_record"]["steps"] == 5 and row["kohya_it_per_s"] > 0, data["kohya_notes"]

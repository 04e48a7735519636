"""Cached text-encoder outputs (kohya's ``cache_text_encoder_outputs``): refused where they would
change training, and where allowed the run trains on the same numbers without running the
encoders at any step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer
from tiny_sdxl import sgm_dir, write_tiny_sdxl_checkpoint

from lorakit_ext.cli import main
from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.project import create_project
from lorakit_ext.train.text_cache import TextCache
from lorakit_ext.train_config import TrainConfig

FROZEN = dict(
    resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=2, train_batch_size=2, max_train_epochs=2,
    optimizer="AdamW", network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=0.0, shuffle_tags=False,
    lr_scheduler="constant", keep_only_last_n_epochs=0,
)


@pytest.mark.parametrize("change, remedy", [
    ({"text_encoder_lr": 1e-4}, "text_encoder_lr = 0"),
    ({"shuffle_tags": True}, "shuffle_tags off"),
    ({"caption_dropout_rate": 0.1}, "caption_dropout_rate = 0"),
])
def test_caching_is_refused_where_captions_or_encoders_would_change(change, remedy):
    config = TrainConfig(**{**FROZEN, "cache_text_encoder_outputs": True, **change})
    with pytest.raises(UserError, match="cache_text_encoder_outputs") as caught:
        config.validate()
    assert remedy in str(caught.value) and "turn the caching off" in str(caught.value)


def test_each_distinct_caption_is_encoded_once_and_batches_follow_item_indices():
    calls = []

    def encode(chunk):
        calls.append(list(chunk))
        values = torch.tensor([float(len(c)) for c in chunk])
        return {"crossattn": values[:, None, None].expand(-1, 3, 2).clone(), "pooled": values[:, None].clone()}

    captions = ["a", "bb", "a", "ccc"] + [f"x{i}" for i in range(20)]
    cache = TextCache.build(captions, encode)
    assert cache.captions == 23 and len(cache) == 24
    assert sum(len(c) for c in calls) == 23 and len(calls) == 2
    states = cache.states([3, 0, 2])
    assert states["crossattn"].shape == (3, 3, 2)
    assert states["pooled"][:, 0].tolist() == [3.0, 1.0, 1.0]


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


def _train(tiny_sd15_dir, project, tmp_path, name, **overrides):
    config = TrainConfig(**{**FROZEN, **overrides}).validate()
    trainer = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / name, name)
    encoder_calls = []
    trainer.model.text_encoders["te"].register_forward_hook(lambda *args: encoder_calls.append(1))
    result = trainer.run()
    return result, len(encoder_calls)


def test_a_cached_run_trains_on_the_same_numbers_without_running_the_encoder_at_any_step(tiny_sd15_dir, project, tmp_path):
    live, live_calls = _train(tiny_sd15_dir, project, tmp_path, "live")
    cached, cached_calls = _train(tiny_sd15_dir, project, tmp_path, "cached", cache_text_encoder_outputs=True)
    # One encoder call per step, and one per validation batch (1 per epoch here).
    assert live_calls == live.steps + 2
    # 4 distinct captions: one call for the training captions and one for validation's, before the first step.
    assert cached_calls == 2
    assert [v for _, _, v in cached.validation] == pytest.approx([v for _, _, v in live.validation], rel=1e-4)
    assert len(cached.losses) == live.steps == 8
    assert cached.losses == pytest.approx(live.losses, rel=1e-4, abs=1e-6)
    live_tensors, _ = read_lora_file(live.files[-1])
    cached_tensors, _ = read_lora_file(cached.files[-1])
    assert live_tensors.keys() == cached_tensors.keys()
    for key, tensor in live_tensors.items():
        assert torch.allclose(cached_tensors[key].float(), tensor.float(), atol=1e-3), key
    assert any(t.abs().max() > 0 for k, t in cached_tensors.items() if k.endswith("lora_up.weight"))


def test_sdxl_low_vram_preset_caches_both_encoders_and_trains_the_unet_alone(tmp_path, capsys, project):
    sgm_dir()
    checkpoint = write_tiny_sdxl_checkpoint(tmp_path / "model", v=False)
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--json", "--preset", "Low VRAM",
            "--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
            "--set=network_dim=4", "--set=gradient_checkpointing=false", "--repeats", "1", "--epochs", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    tensors, _ = read_lora_file(out["files"][-1])
    assert {k.split("_", 2)[1] for k in tensors} == {"unet"}
    losses = [float(line.split(",")[1]) for line in (Path(out["run_dir"]) / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    config = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert config["cache_text_encoder_outputs"] is True and config["shuffle_tags"] is False


@pytest.mark.parametrize("room, expected", [
    # The outputs first with everything resident; the encoders leave for the run before the VAE
    # works; the UNet stays where the VAE's activations fit beside it.
    (True, {"te": set(), "vae": {"te"}, "unet": {"te", "vae"}}),
    # Where they do not, the UNet waits on the CPU while the VAE works.
    (False, {"te": set(), "vae": {"te", "unet"}, "unet": {"te", "vae"}}),
])
def test_cached_encoders_leave_before_the_vae_works_and_the_run_returns_every_module(
        tiny_sd15_dir, project, tmp_path, monkeypatch, room, expected):
    # On a GPU the modules not at work wait on the CPU (tests/gpu checks the real moves); here a
    # stand-in for the move records what is away whenever each part of the model runs.
    from lorakit_ext.train import gpu_memory

    away: set[int] = set()

    def park(module, device):
        away.add(id(module))
        return lambda: away.discard(id(module))

    monkeypatch.setattr(gpu_memory, "park", park)
    monkeypatch.setattr(gpu_memory, "has_room", lambda device, nbytes: room)
    config = TrainConfig(**{**FROZEN, "cache_text_encoder_outputs": True}).validate()
    messages = []
    trainer = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "moves", "moves", on_progress=lambda p: messages.append(p.message))
    model = trainer.model
    names = {id(model.unet): "unet", id(model.text_encoders["te"]): "te", id(model.vae): "vae"}
    seen: dict[str, set[str]] = {}

    def watch(part: str, module):
        def hook(*args):
            seen.setdefault(part, {names[i] for i in away})

        module.register_forward_pre_hook(hook)

    watch("vae", model.vae.encoder)
    watch("te", model.text_encoders["te"])
    watch("unet", model.unet)
    trainer.run()
    assert seen == expected
    assert not away, "every module is back where it was after the run"
    assert any("the UNet waits on the CPU while latents cache" in m for m in messages) is not room

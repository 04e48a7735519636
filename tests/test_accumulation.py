"""Gradient accumulation: two batches of one add up to the same optimizer step as one batch of
two, the schedule counts optimizer steps as kohya does, and an interrupted run resumes at a group
boundary with the same numbers."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train import step as step_module
from lorakit_ext.train.events import Interrupted
from lorakit_ext.train.loss import NoiseSchedule
from lorakit_ext.train.network import injected
from lorakit_ext.train.plan import plan_for
from lorakit_ext.train.precision import Precision
from lorakit_ext.train.preflight import real_schedule
from lorakit_ext.train.state import load_state
from lorakit_ext.train.step import StepFunction
from lorakit_ext.train_config import TrainConfig

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=2, optimizer="AdamW",
             network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=1e-4, lr_scheduler="constant",
             validate_every_n_epochs=0, keep_only_last_n_epochs=0)


NOISE = torch.sin(torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).view(2, 4, 8, 8) * 0.37)


def _lora_after_one_update(sd_model, config, batches, monkeypatch):
    # The batch of two draws both images' noise and timesteps at once.
    monkeypatch.setattr(step_module, "draw_noise", lambda shape, *args: NOISE[: shape[0]])
    monkeypatch.setattr(step_module, "draw_timesteps", lambda batch, gen, device: torch.tensor([150, 650])[:batch])
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    with injected(model, config, seed=3) as network:
        # Plain SGD: the update is the summed gradient itself (Adam's would divide float noise by itself).
        optimizer = torch.optim.SGD(network.param_groups(), lr=1.0)
        step = StepFunction(model, NoiseSchedule("cpu"), config, Precision(None, False), network.parameters(), optimizer, True)
        for index, (latents, captions) in enumerate(batches):
            step(latents, model.tokenize(captions), torch.zeros(len(captions), 6), first=index == 0, last=index == len(batches) - 1)
        return [p.detach().clone() for p in network.parameters()]


def test_two_batches_of_one_make_the_same_update_as_one_batch_of_two(tiny_sd15, monkeypatch):
    sd_model, _ = tiny_sd15
    sd_model.eval()
    torch.manual_seed(0)
    latents, captions = torch.randn(2, 4, 8, 8), ["kat, red hair", "kat, blue shirt"]
    # One timestep per image in both cases: the one-image batches take theirs by position.
    timesteps = iter([torch.tensor([150]), torch.tensor([650])])
    noises = iter([NOISE[:1], NOISE[1:]])
    whole = _lora_after_one_update(sd_model, TrainConfig(**SMALL, min_snr_gamma=0.0), [(latents, captions)], monkeypatch)
    monkeypatch.setattr(step_module, "draw_timesteps", lambda *a, **k: next(timesteps))
    monkeypatch.setattr(step_module, "draw_noise", lambda *a, **k: next(noises))
    config = TrainConfig(**SMALL, min_snr_gamma=0.0, gradient_accumulation_steps=2)
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    with injected(model, config, seed=3) as network:
        # Plain SGD: the update is the summed gradient itself (Adam's would divide float noise by itself).
        optimizer = torch.optim.SGD(network.param_groups(), lr=1.0)
        step = StepFunction(model, NoiseSchedule("cpu"), config, Precision(None, False), network.parameters(), optimizer, True)
        step(latents[:1], model.tokenize(captions[:1]), torch.zeros(1, 6), first=True, last=False)
        untouched = [p.detach().clone() for p in network.parameters()]
        step(latents[1:], model.tokenize(captions[1:]), torch.zeros(1, 6), first=False, last=True)
        parts = [p.detach().clone() for p in network.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(untouched, parts))  # the update came at the group's end
    worst = max(float((a - b).abs().max()) for a, b in zip(whole, parts))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(whole, parts)), worst


def test_the_schedule_and_the_plan_count_optimizer_steps():
    config = TrainConfig(gradient_accumulation_steps=4, max_train_epochs=3, lr_warmup_ratio=0.1)
    schedule = real_schedule(config, batches_per_epoch=10)
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (3, 9, 0)  # ceil(10 / 4)
    plan = plan_for(config, 12)
    assert plan.total_steps == int(3 * 12 * 10 / 2 / 4) and "With gradient accumulation 4: 4 batches (8 images)" in plan.text


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


def _trainer(tiny_sd15_dir, project, tmp_path, name, **kwargs):
    config = TrainConfig(**{**SMALL, "train_batch_size": 1, "gradient_accumulation_steps": 2}).validate()
    return tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / name, name, **kwargs)


def test_a_run_counts_optimizer_steps_and_resumes_at_a_group_boundary(tiny_sd15_dir, project, tmp_path, one_thread):
    full = _trainer(tiny_sd15_dir, project, tmp_path, "full").run()
    assert full.steps == 2 * 2 and len(full.losses) == 4  # 4 images, batch 1, 2 per step, 2 epochs
    with safe_open(str(full.files[-1]), "pt") as f:
        metadata = f.metadata()
    # As kohya counts: batches per epoch before accumulation, optimizer steps in total.
    assert (metadata["ss_num_batches_per_epoch"], metadata["ss_max_train_steps"], metadata["ss_steps"]) == ("4", "4", "4")
    reports = []
    first = _trainer(tiny_sd15_dir, project, tmp_path, "cut", should_stop=lambda: len(reports) >= 1)
    first.on_progress = lambda p: reports.append(p) if p.phase == "training" and p.total_steps and not p.message else None
    with pytest.raises(Interrupted):
        first.run()
    state = load_state(project.runs / "cut")
    assert state["position"]["step_in_epoch"] % 2 == 0 and state["position"]["global_step"] == 1
    resumed = _trainer(tiny_sd15_dir, project, tmp_path, "cut").run(resume_state=state)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    with safe_open(str(full.files[-1]), "pt") as a, safe_open(str(resumed.files[-1]), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

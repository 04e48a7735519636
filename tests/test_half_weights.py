"""The LoRA weights' half copies for training forwards under autocast: the same training numbers
as autocast's own casts, with a few flat copies per step instead of several per layer."""

from __future__ import annotations

import math

import pytest
import torch
from copy_count import Copies
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.models import compiled_blocks
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train import loop
from lorakit_ext.train import step as step_module
from lorakit_ext.train.half_weights import HalfWeights
from lorakit_ext.train.loss import NoiseSchedule
from lorakit_ext.train.network import HALF_WEIGHTS, injected
from lorakit_ext.train.precision import Precision
from lorakit_ext.train.step import StepFunction
from lorakit_ext.train_config import TrainConfig

SMALL = dict(resolution=64, network_dim=4, network_alpha=2.0, unet_lr=1e-2, text_encoder_lr=1e-3, optimizer="AdamW",
             min_snr_gamma=0.0)
# Half training runs under CUDA's autocast; the CPU's bf16 autocast casts the same way.
BF16 = Precision(torch.bfloat16, False)


def test_the_flat_buffers_keep_values_and_fold_gradients_into_fp32():
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7, 1, 1, 2))]
    values = [p.detach().clone() for p in params]
    half = HalfWeights(params, torch.bfloat16)
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(torch.equal(half.of[p], v.bfloat16()) and half.of[p].requires_grad for p, v in zip(params, values))
    (half.of[params[0]].float().sum() * 3).backward()
    half.fold_gradients()
    half.fold_gradients()  # a second fold adds nothing: the half gradients were taken
    assert torch.equal(params[0].grad, torch.full((3, 5), 3.0)) and not params[1].grad.any()
    with torch.no_grad():
        params[1].add_(1)
    assert not torch.equal(half.of[params[1]], params[1].bfloat16())
    half.refresh()
    assert torch.equal(half.of[params[1]], params[1].detach().bfloat16())


def _train(sd_model, config, half: bool, monkeypatch, batches: int = 1):
    """Three optimizer steps at bf16 on the CPU; the LoRA weights, a no-grad prediction after them
    (what validation and samples see) and the number of copies in the last step."""
    monkeypatch.setattr(step_module, "draw_timesteps", lambda batch, gen, device: torch.tensor([150, 650])[:batch])
    torch.manual_seed(0)
    latents, captions = torch.randn(2, 4, 8, 8), ["kat, red hair", "kat, blue shirt"]
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    with injected(model, config, seed=3) as network:
        half_weights = network.use_half_weights(torch.bfloat16) if half else None
        optimizer = torch.optim.AdamW(network.param_groups())
        step = StepFunction(model, NoiseSchedule("cpu"), config, BF16, network.parameters(), optimizer, True,
                            half_weights=half_weights)
        ids, sizes = model.tokenize(captions), torch.zeros(2, 6)
        for n in range(3):
            torch.manual_seed(n)
            with Copies() as copies:
                for b in range(batches):
                    rows = slice(b * 2 // batches, (b + 1) * 2 // batches)
                    step(latents[rows], ids[rows], sizes[rows], first=b == 0, last=b == batches - 1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = torch.tensor([400, 400])
            prediction = model.predict(latents, t, model.condition(model.encode_text(ids), sizes)).float()
        return [p.detach().clone() for p in network.parameters()], prediction, copies.count


@pytest.mark.parametrize("network_type", ["LoRA", "LoCon"])
def test_training_with_half_copies_gives_autocasts_numbers_with_fewer_copies(tiny_sd15, monkeypatch, one_thread, network_type):
    sd_model, _ = tiny_sd15
    sd_model.eval()
    config = TrainConfig(**SMALL, network_type=network_type)
    plain, plain_prediction, plain_copies = _train(sd_model, config, False, monkeypatch)
    ours, prediction, copies = _train(sd_model, config, True, monkeypatch)
    assert sum(float(p.abs().sum()) for p in ours[1::2]) > 0  # the up weights start at zero: training moved them
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    assert torch.equal(prediction, plain_prediction)
    # Each layer's four casts (two weights, forward and gradient) became one flat copy per step.
    layers = len(plain) // 2
    assert plain_copies - copies >= 4 * layers - 1, (plain_copies, copies, layers)


def test_accumulated_batches_fold_into_one_update(tiny_sd15, monkeypatch, one_thread):
    sd_model, _ = tiny_sd15
    sd_model.eval()
    config = TrainConfig(**SMALL, gradient_accumulation_steps=2)
    plain, _, _ = _train(sd_model, config, False, monkeypatch, batches=2)
    ours, _, _ = _train(sd_model, config, True, monkeypatch, batches=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))


def test_lohas_keep_their_own_forward(tiny_sd15):
    sd_model, _ = tiny_sd15
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    with injected(model, TrainConfig(**SMALL, network_type="LoHa"), seed=3) as network:
        assert network.use_half_weights(torch.bfloat16) is None


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


@pytest.mark.parametrize("compiled", [False, True], ids=["stock", "compiled-blocks"])
def test_a_half_precision_run_trains_on_half_copies_unless_its_blocks_are_compiled(tiny_sd15_dir, project, tmp_path, monkeypatch,
                                                                                compiled):
    monkeypatch.setattr(loop, "resolve_precision", lambda *args: BF16)
    monkeypatch.setattr(compiled_blocks, "BACKEND", "eager")
    made = []
    monkeypatch.setattr(HalfWeights, "refresh", lambda self, stock=HalfWeights.refresh: made.append(self) or stock(self))
    config = TrainConfig(**SMALL, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=2,
                         train_batch_size=2, lr_scheduler="constant", keep_only_last_n_epochs=0,
                         gradient_checkpointing=True).validate()  # the recompute uses the half copies too
    trainer = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "out")
    trainer.job.compile_blocks = compiled
    result = trainer.run()
    assert [p.name for p in result.files] == ["kat-01.safetensors", "kat-02.safetensors"]
    assert all(math.isfinite(loss) for loss in result.losses)
    # One refresh when the copies are made, then one per optimizer step; none with compiled blocks.
    assert len(made) == (0 if compiled else 1 + result.steps)
    assert not any(hasattr(m, HALF_WEIGHTS) for m in trainer.model.sd_model.modules())

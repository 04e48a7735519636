"""kohya's noise options: multi-resolution (pyramid) noise and input perturbation
(``ip_noise_gamma``), each as sd-scripts computes it, written into the files and the kohya TOML."""

from __future__ import annotations

import pytest
import torch
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.loss import NoiseSchedule, draw_noise, pyramid_noise
from lorakit_ext.train.precision import Precision
from lorakit_ext.train.step import StepFunction
from lorakit_ext.train_config import TrainConfig, load_config_file


def _neighbour_correlation(noise: torch.Tensor) -> float:
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_pyramid_noise_has_unit_spread_and_coarse_structure_white_noise_lacks():
    torch.manual_seed(0)
    white = torch.randn(4, 4, 64, 64)
    pyramid = pyramid_noise(white.clone(), iterations=6, discount=0.8)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert abs(_neighbour_correlation(white)) < 0.05 and _neighbour_correlation(pyramid) > 0.1
    torch.manual_seed(1)
    first = draw_noise((2, 4, 32, 32), "cpu", None, 0.0, 6, 0.3)
    torch.manual_seed(1)
    assert torch.equal(first, draw_noise((2, 4, 32, 32), "cpu", None, 0.0, 6, 0.3))  # seeded: repeatable


def test_input_perturbation_noises_the_latents_but_keeps_the_target(tiny_sd15):
    sd_model, _ = tiny_sd15
    model = LdmModel(sd_model.eval(), clip_skip=1, max_token_length=75)
    config = TrainConfig(min_snr_gamma=0.0, ip_noise_gamma=0.1)
    schedule = NoiseSchedule("cpu")
    step = StepFunction(model, schedule, config, Precision(None, False), [], None, train_te=False)
    latents, noise, perturbed = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, ids, sizes = torch.tensor([200, 700]), model.tokenize(["kat", "dog"]), torch.zeros(2, 6)
    with torch.no_grad():
        got = step.loss(latents, ids, sizes, noise, t, input_noise=perturbed)
        cond = model.condition(model.encode_text(ids), sizes)
        pred = model.predict(schedule.add_noise(latents, perturbed, t), t, cond)
        assert torch.allclose(got, (pred - noise).square().mean(), rtol=1e-5)
        assert not torch.allclose(got, step.loss(latents, ids, sizes, noise, t), rtol=1e-3)


def test_multires_noise_turns_cuda_graphs_off_with_the_reason_and_refuses_the_offset_beside_it():
    step = StepFunction.__new__(StepFunction)
    step.config, step.grad_scaler = TrainConfig(multires_noise_iterations=6), None
    assert step.host_sync_reason == "multires noise draws its pyramid at new sizes every step"
    with pytest.raises(UserError, match="noise_offset and multires_noise_iterations are alternatives"):
        TrainConfig(noise_offset=0.05, multires_noise_iterations=6).validate()


def test_a_run_with_both_trains_and_says_so_in_its_files(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=1,
                         optimizer="AdamW", network_dim=4, multires_noise_iterations=6, multires_noise_discount=0.3,
                         ip_noise_gamma=0.1).validate()
    result = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "out").run()
    assert len(result.losses) == 2 and all(0 < x < 10 for x in result.losses)
    metadata = read_lora_metadata(result.files[-1])
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_ip_noise_gamma"]) == ("6", "0.1")
    kohya = load_config_file(result.run_dir / "kohya_config.toml")
    assert (kohya["multires_noise_iterations"], kohya["multires_noise_discount"], kohya["ip_noise_gamma"]) == (6, 0.3, 0.1)

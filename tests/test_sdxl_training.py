"""Training SDXL: the conditioning is SDXL's own (checked against sgm's conditioner), runs train
headless from a checkpoint file (ε and v-prediction with zero terminal SNR), gradient
checkpointing gives LoRA weights their gradients on sgm's blocks, and the fp16 VAE comes back bit
for bit. The model tests need sgm (``LORAKIT_SGM_DIR``; see ``tests/tiny_sdxl.py``); the size
conditioning is plain arithmetic and runs everywhere."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_datasets import fill_dataset
from tiny_sdxl import sgm_dir, write_tiny_sdxl_checkpoint
from zero_init import zeroes

from lorakit_ext.cli import main
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.project import create_project
from lorakit_ext.train.buckets import place_image, size_conditioning
from lorakit_ext.train.loss import NoiseSchedule, diffusion_loss
from lorakit_ext.train_config import load_config_file

SMALL = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
         "--set=network_dim=4", "--set=lr_scheduler=constant", "--set=gradient_checkpointing=false",
         "--repeats", "1", "--batch-size", "2", "--epochs", "2"]


# ---- size conditioning (no sgm needed) --------------------------------------------------------
def test_size_conditioning_is_kohyas():
    # kohya (train_util.get_crop_ltrb) tells SDXL the letterbox offsets of the image fitted inside
    # its bucket: a 2:1 image in a square bucket is "cropped" 256 from the top, 0 from the left.
    square = place_image((2000, 1000), 1024, buckets=[(1024, 1024)])
    assert size_conditioning(square, flipped=False) == (1000, 2000, 256, 0, 1024, 1024)
    # A tall image in a wider bucket: fitted by height, offset from the left; mirrored, the offset
    # is measured from the right edge.
    tall = place_image((600, 1000), 1024, buckets=[(896, 1152)])
    left = (896 - 1152 * 0.6) // 2
    assert size_conditioning(tall, flipped=False) == (1000, 600, 0, int(left), 1152, 896)
    assert size_conditioning(tall, flipped=True) == (1000, 600, 0, int(896 - (left + 1152 * 0.6)), 1152, 896)


def test_zero_terminal_snr_ends_in_pure_noise_and_weights_it_zero():
    schedule = NoiseSchedule("cpu", zero_terminal=True)
    stock = NoiseSchedule("cpu")
    assert schedule.snr[-1] == 0 and schedule.sqrt_alpha[-1] == 0
    assert torch.isclose(schedule.sqrt_alpha[0], stock.sqrt_alpha[0])
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    snr = schedule.snr[torch.tensor([999, 999])]
    # v-prediction: min-SNR and kohya's "scale like ε" both weight the pure-noise step 0 (no NaN).
    assert diffusion_loss(pred, target, snr, 5.0, True, scale_v_like_noise=True) == 0
    t = torch.tensor([500])
    s = schedule.snr[t]
    expected = torch.clamp(s, max=5.0) / (s + 1) * s / (s + 1)
    assert torch.allclose(diffusion_loss(pred[:1], target[:1], s, 5.0, True, scale_v_like_noise=True), expected)


# ---- the model --------------------------------------------------------------------------------
@pytest.fixture
def sdxl(tiny_sdxl):
    from lorakit_ext.models.families import adapter_for

    return adapter_for(copy.deepcopy(tiny_sdxl))


def test_conditioning_is_what_sgms_conditioner_gives_at_inference(tiny_sdxl):
    from lorakit_ext.models.families import adapter_for

    model = adapter_for(tiny_sdxl, max_token_length=75)
    captions = ["kat, red hair, smile", "a photo of a dog on a beach"]
    sizes = torch.tensor([[1024, 768, 0, 32, 1024, 768], [832, 1216, 16, 0, 832, 1216]], dtype=torch.float32)
    with torch.no_grad():
        ours = model.condition(model.encode_text(model.tokenize(captions)), sizes)
        batch = {"txt": captions, "original_size_as_tuple": sizes[:, 0:2], "crop_coords_top_left": sizes[:, 2:4],
                 "target_size_as_tuple": sizes[:, 4:6]}
        theirs = tiny_sdxl.conditioner(batch)
    assert torch.allclose(ours["crossattn"], theirs["crossattn"], atol=1e-5)
    assert torch.allclose(ours["vector"], theirs["vector"], atol=1e-5)


def test_long_captions_use_three_chunks_and_the_first_chunks_pooled_output(sdxl):
    ids = sdxl.tokenize(["kat, " * 100])
    assert ids.shape == (1, 2, 3, 77)
    # bigG's ids pad with 0 after each chunk's first EOS; CLIP-L's with EOS.
    assert (ids[0, 1, 2] == 0).sum() > 0 and (ids[0, 0, 2] == 0).sum() == 0
    with torch.no_grad():
        cond = sdxl.condition(sdxl.encode_text(ids), torch.zeros(1, 6))
    assert cond["crossattn"].shape == (1, 227, 96) and cond["vector"].shape == (1, 64 + 6 * 256)


def test_gradient_checkpointing_gives_lora_the_same_gradients_on_sgm_blocks(sdxl):
    from lorakit_ext.train.checkpointing import configure_checkpointing
    from lorakit_ext.train.network import injected
    from lorakit_ext.train_config import TrainConfig

    config = TrainConfig(network_dim=4, text_encoder_lr=0.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ids = sdxl.tokenize(["kat", "dog"])
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        with injected(sdxl, config, seed=1) as network:
            torch.manual_seed(0)
            for p in network.parameters():
                torch.nn.init.normal_(p, std=0.02)
            undo = configure_checkpointing(sdxl.unet, checkpointing)
            try:
                sdxl.predict(x, t, sdxl.condition(sdxl.encode_text(ids), sizes)).square().mean().backward()
            finally:
                undo()
            return [p.grad.clone() for p in network.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in checkpointed[:10])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_an_fp16_vae_encodes_in_fp32_and_comes_back_bit_for_bit(sdxl):
    sdxl.vae.half()
    before = {k: v.clone() for k, v in sdxl.vae.state_dict().items()}
    latents = sdxl.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert torch.isfinite(latents).all() and latents.dtype == torch.float32
    after = sdxl.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


# ---- whole runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [False, True])
def test_an_sdxl_run_trains_headless_and_its_files_are_kohyas_sdxl_files(tmp_path, capsys, v):
    sgm_dir()
    checkpoint = write_tiny_sdxl_checkpoint(tmp_path / "model", v=v)
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    extra = ["--preset", "NoobAI v-pred"] if v else []
    assert main(["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--json", *extra, *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(f).name for f in out["files"]] == ["kat-01.safetensors", "kat-02.safetensors"]
    tensors, metadata = read_lora_file(out["files"][-1])
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert metadata["ss_zero_terminal_snr"] == str(v)
    prefixes = {k.split("_", 2)[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    ups = {k: t for k, t in tensors.items() if k.endswith("lora_up.weight")}
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te2_text_model_encoder_layers_0_self_attn_"):
        assert any(t.abs().max() > 0 for k, t in ups.items() if k.startswith(prefix)), prefix
    losses = [float(line.split(",")[1]) for line in (Path(out["run_dir"]) / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    kohya = load_config_file(Path(out["run_dir"]) / "kohya_config.toml")
    assert kohya.get("v_parameterization", False) is v and kohya.get("zero_terminal_snr", False) is v
    assert "sdxl_train_network.py" in (Path(out["run_dir"]) / "kohya_config.toml").read_text()
    assert (Path(out["run_dir"]) / "config.json").is_file()


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_before_training(tmp_path, capsys):
    sgm_dir()
    checkpoint = write_tiny_sdxl_checkpoint(tmp_path / "model", v=False)
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    code = main(["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--set=zero_terminal_snr=true", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "zero_terminal_snr" in err and "v-prediction" in err
    assert not list((project.path / "output").glob("*.safetensors"))


def test_loading_sdxl_leaves_its_block_outputs_unwritten_and_restores_zero_module(tmp_path):
    """sgm zeroes every block's output layer as it builds; the checkpoint overwrites them."""
    sgm_dir()
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.ldm_import import _zero_module_holders, skip_random_init

    checkpoint = write_tiny_sdxl_checkpoint(tmp_path / "model")
    model, _ = load_sd_checkpoint(checkpoint)
    output_layer = model.model.diffusion_model.out[-1]
    assert not output_layer.weight.eq(0).all()  # the file's weights, not zeros left by the build

    holders = [module for module in _zero_module_holders() if module.__name__.startswith("sgm.")]
    assert "sgm.modules.diffusionmodules.openaimodel" in {module.__name__ for module in holders}
    with skip_random_init():
        assert not any(zeroes(module.zero_module) for module in holders)
    assert all(zeroes(module.zero_module) for module in holders)

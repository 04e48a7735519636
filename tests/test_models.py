"""Building and loading real ldm Stable Diffusion models offline: the tiny SD1.5 model every
training test uses, checkpoint formats, architecture detection and the errors a user sees."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from tiny_sd2 import TINY_SD2_WIDTHS, tiny_sd2_config
from zero_init import zeroes

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.models.checkpoint import load_sd_checkpoint, read_state_dict
from lorakit_ext.models.families import detect_family
from lorakit_ext.models.families.sd1 import SD1
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.models.ldm_import import import_ldm
from lorakit_ext.models.tiny import TINY_NAME, build_random_sd15, build_tiny_sd15

PROMPT = "a photo of a cat"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_ckpt(tiny_sd15_dir):
    return tiny_sd15_dir / f"{TINY_NAME}.safetensors"


def _kohya_unet_targets(unet) -> list[str]:
    from ldm.modules.attention import SpatialTransformer

    names = []
    for st_name, st in unet.named_modules():
        if isinstance(st, SpatialTransformer):
            for name, m in st.named_modules():
                if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)):
                    names.append(f"{st_name}.{name}")
    return names


# ---- importing ldm -----------------------------------------------------------------------------


def test_ldm_imports_without_noise():
    """Also on a machine where torchvision's CUDA build sits next to CPU torch (this venv's case)."""
    code = "from lorakit_ext.models.ldm_import import import_ldm; import_ldm(); import torchvision.utils"
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_missing_ldm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ldm", None)
    import_ldm.cache_clear()
    try:
        with pytest.raises(UserError, match="stable-diffusion-sdkit==2.1.5.*\\[ldm\\]"):
            import_ldm()
    finally:
        import_ldm.cache_clear()


def test_a_build_for_a_checkpoint_leaves_block_outputs_unwritten_and_restores_zero_module(tiny_ckpt):
    """ldm zeroes every block's output layer as it builds: a quarter of a full UNet written page by
    page, which the checkpoint overwrites. Models built for other uses still get their zeros."""
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    from lorakit_ext.models.ldm_import import _zero_module_holders, skip_random_init

    load_sd_checkpoint(tiny_ckpt)
    holders = _zero_module_holders()
    assert openaimodel in holders
    with skip_random_init():
        assert not any(zeroes(module.zero_module) for module in holders)
    assert all(zeroes(module.zero_module) for module in holders)


# ---- the tiny SD1.5 model ------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_seeded(tiny_ckpt, tmp_path):
    again = build_tiny_sd15(tmp_path / "again")
    other_seed = build_tiny_sd15(tmp_path / "other", seed=7)
    assert _sha256(again) == _sha256(tiny_ckpt)
    assert _sha256(other_seed) != _sha256(tiny_ckpt)


def test_tiny_checkpoint_uses_sd15_key_layout_in_fp16(tiny_ckpt):
    with safe_open(str(tiny_ckpt), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
        proj_in = f.get_tensor("model.diffusion_model.middle_block.1.proj_in.weight")
        schedule = f.get_tensor("alphas_cumprod")
    for key in (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight",
    ):
        assert key in keys
    assert not any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.4.") for k in keys)
    assert q.dtype == torch.float16 and q.shape == (32, 32)
    assert proj_in.dim() == 4  # SD1's 1x1 conv, not SD2's Linear
    assert schedule.dtype == torch.float32


def test_tiny_yaml_and_clip_folder_load_on_their_own(tiny_ckpt):
    from omegaconf import OmegaConf
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = OmegaConf.load(tiny_ckpt.with_suffix(".yaml"))
    clip = tiny_ckpt.parent / "clip"
    assert cfg.model.params.cond_stage_config.params.version == str(clip)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip))
    assert tokenizer(PROMPT).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    text_model = CLIPTextModel.from_pretrained(str(clip))
    assert text_model.config.hidden_size == 32 and text_model.config.num_hidden_layers == 4
    with safe_open(str(tiny_ckpt), "pt") as f:
        bias = f.get_tensor("cond_stage_model.transformer.text_model.final_layer_norm.bias")
    assert torch.equal(text_model.text_model.final_layer_norm.bias.half(), bias)


def test_lora_target_counts_match_sd15(tiny_sd15):
    model, info = tiny_sd15
    targets = _kohya_unet_targets(model.model.diffusion_model)
    assert len(targets) == 192
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in targets
    assert "output_blocks.11.1.proj_out" in targets
    te_layers = model.cond_stage_model.transformer.text_model.encoder.layers
    te_targets = [
        f"{i}.{name}"
        for i, layer in enumerate(te_layers)
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    assert len(te_targets) == 4 * 6
    assert (info.family, info.v_parameterization, info.resolution) == (SD1, False, 512)


def test_vae_latents_have_sd_shape(tiny_sd15):
    model, _ = tiny_sd15
    with torch.no_grad():
        latents = model.get_first_stage_encoding(model.encode_first_stage(torch.rand(2, 3, 64, 48) * 2 - 1))
    assert latents.shape == (2, 4, 8, 6)
    assert torch.isfinite(latents).all()


def test_text_encoder_gives_77_tokens_with_nonzero_mean(tiny_sd15):
    model, _ = tiny_sd15
    with torch.no_grad():
        cond = model.cond_stage_model([PROMPT])
    assert cond.shape == (1, 77, 32)
    # A1111's emphasis rescales by this mean; ~0 would give NaNs.
    assert cond.mean().abs() > 0.1


def test_prediction_depends_on_prompt(tiny_sd15):
    model, _ = tiny_sd15
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        cat = model.apply_model(x, t, model.cond_stage_model([PROMPT]))
        dog = model.apply_model(x, t, model.cond_stage_model(["a photo of a dog"]))
    assert torch.isfinite(cat).all() and cat.abs().mean() > 0.01
    assert (cat - dog).abs().max() > 1e-4


def test_loads_in_fp16_keeping_the_schedule_fp32(tiny_ckpt):
    model, _ = load_sd_checkpoint(tiny_ckpt, dtype=torch.float16)
    assert next(model.model.parameters()).dtype == torch.float16
    assert next(model.cond_stage_model.parameters()).dtype == torch.float16
    assert model.alphas_cumprod.dtype == torch.float32


def test_model_info_hashes_follow_a1111(tiny_sd15, tiny_ckpt):
    _, info = tiny_sd15
    data = tiny_ckpt.read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.short_hash == info.sha256[:10]
    assert info.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_random_in_memory_model_is_usable(tiny_sd15):
    model = build_random_sd15("cpu", torch.float32, full=False)
    reference, _ = tiny_sd15
    assert model.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        eps = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), model.cond_stage_model([PROMPT]))
    assert eps.abs().mean() > 0.01


# ---- checkpoint formats and errors -----------------------------------------------------------------


def test_ckpt_round_trip(tiny_sd15, tiny_ckpt, tmp_path):
    reference, _ = tiny_sd15
    buf = io.BytesIO()
    torch.save({"state_dict": read_state_dict(tiny_ckpt), "global_step": 3}, buf)
    ckpt = tmp_path / "copy.ckpt"
    atomic_write_bytes(ckpt, buf.getvalue())
    shutil.copy(tiny_ckpt.with_suffix(".yaml"), ckpt.with_suffix(".yaml"))
    model, info = load_sd_checkpoint(ckpt)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], reference.state_dict()[key])
    assert info.family is SD1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("noise.safetensors", b"\x13" * 4096, "damaged"),
        ("empty.safetensors", b"", "damaged"),
        ("text.ckpt", b"not a checkpoint", "damaged"),
        ("model.bin", b"", ".safetensors or .ckpt"),
    ],
)
def test_unreadable_files_give_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load_sd_checkpoint(path)
    assert name in str(err.value)


def test_truncated_files_give_user_errors(tiny_ckpt, tmp_path):
    half = tmp_path / "half.safetensors"
    half.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    with pytest.raises(UserError, match="half.safetensors is damaged"):
        load_sd_checkpoint(half)
    buf = io.BytesIO()
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, buf)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(buf.getvalue()[:300])
    with pytest.raises(UserError, match="cut.ckpt is damaged"):
        load_sd_checkpoint(cut)


def test_missing_file_and_config(tiny_ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sd_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="nope.yaml does not exist"):
        load_sd_checkpoint(tiny_ckpt, config=tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, "LoRA, VAE"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280),
            },
            "SDXL",
        ),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, "inpainting"),
    ],
)
def test_other_architectures_are_refused(tmp_path, tensors, message):
    path = tmp_path / "other.safetensors"
    atomic_write_bytes(path, save(tensors))
    with pytest.raises(UserError, match=message):
        load_sd_checkpoint(path)


def test_nonstandard_widths_without_yaml_are_refused(tiny_ckpt, tmp_path):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tiny_ckpt, bare)
    with pytest.raises(UserError, match="SD1 keys but not SD1's layer widths.*yaml"):
        load_sd_checkpoint(bare)


def test_config_for_another_model_is_reported(tiny_ckpt, tiny_sd2, tmp_path):
    _, sd2_yaml = tiny_sd2
    with pytest.raises(UserError, match="lacks .* weights"):
        load_sd_checkpoint(tiny_ckpt, config=sd2_yaml)


# ---- SD2 ---------------------------------------------------------------------------------------


def test_sd2_checkpoint_loads_as_sd2_v(tiny_sd2):
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    path, _ = tiny_sd2
    model, info = load_sd_checkpoint(path)
    assert (info.family, info.v_parameterization, info.resolution) == (SD2, True, 768)
    assert isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder)
    assert model.parameterization == "v"
    assert model.model.diffusion_model.middle_block[1].proj_in.weight.dim() == 2  # SD2's Linear proj
    with torch.no_grad():
        assert model.cond_stage_model([PROMPT]).shape == (1, 77, 32)


def test_family_is_detected_from_keys(tiny_sd2, tiny_ckpt, tmp_path):
    sd2_path, _ = tiny_sd2
    assert detect_family(read_state_dict(sd2_path), sd2_path) is SD2
    assert detect_family(read_state_dict(tiny_ckpt), tiny_ckpt) is SD1
    bare = tmp_path / "bare-sd2.safetensors"
    shutil.copy(sd2_path, bare)
    # Without a yaml the loader picks SD2's full-size config from the keys, and says these widths differ.
    with pytest.raises(UserError, match="SD2 keys but not SD2's layer widths"):
        load_sd_checkpoint(bare)


@pytest.mark.parametrize("out_bias, v", [(-3.0, True), (0.4, False)])
def test_sd2_without_yaml_gets_v_from_a1111s_test(tiny_sd2, tmp_path, monkeypatch, out_bias, v):
    """The no-yaml path as for a full-size SD2 file, with the full-size config swapped for the tiny one.
    A UNet whose output sits far below the flat 0.5 input at t=999 is what a v-model predicts there."""
    sd2_path, _ = tiny_sd2
    tensors = read_state_dict(sd2_path)
    tensors["model.diffusion_model.out.2.weight"].zero_()
    tensors["model.diffusion_model.out.2.bias"].fill_(out_bias)
    bare = tmp_path / "bare-sd2.safetensors"
    atomic_write_bytes(bare, save(tensors))
    monkeypatch.setattr(SD2, "model_config", lambda state_dict: tiny_sd2_config(v=False))
    monkeypatch.setattr(SD2, "widths", TINY_SD2_WIDTHS)
    model, info = load_sd_checkpoint(bare)
    assert (info.family, info.v_parameterization, info.resolution) == (SD2, v, 768 if v else 512)
    assert model.parameterization == ("v" if v else "eps")


def test_a1111_dir_lends_its_copies_of_the_model_code_that_exist(tmp_path, monkeypatch):
    from lorakit_ext.errors import UserError
    from lorakit_ext.models.ldm_import import LDM_DIR_ENV
    from lorakit_ext.models.sgm_import import SGM_DIR_ENV, use_a1111_model_code

    monkeypatch.delenv(LDM_DIR_ENV, raising=False)
    monkeypatch.delenv(SGM_DIR_ENV, raising=False)
    with pytest.raises(UserError, match="has neither"):
        use_a1111_model_code(tmp_path)
    ldm = tmp_path / "repositories" / "stable-diffusion-stability-ai"
    (ldm / "ldm").mkdir(parents=True)
    (ldm / "ldm" / "util.py").write_text("")  # a namespace package, as Stability-AI's
    use_a1111_model_code(tmp_path)  # an install that never ran SDXL has no sgm: SD1/SD2 still train
    assert os.environ[LDM_DIR_ENV] == str(ldm) and SGM_DIR_ENV not in os.environ
    monkeypatch.setenv(LDM_DIR_ENV, "/the/users/own")
    use_a1111_model_code(tmp_path)
    assert os.environ[LDM_DIR_ENV] == "/the/users/own"  # a folder the user named is kept


# ---- the checkpoint's hashes ---------------------------------------------------------------------


def test_hashes_computed_in_the_background_are_a1111s_and_reach_the_model_info(tiny_ckpt, tmp_path):
    from concurrent.futures import Future

    from lorakit_ext.models.file_hashes import file_hashes, hashes_in_background

    data = tiny_ckpt.read_bytes()
    expected = (hashlib.sha256(data).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])
    assert file_hashes(tiny_ckpt) == expected == hashes_in_background(tiny_ckpt).result(timeout=60)
    with pytest.raises(FileNotFoundError):
        hashes_in_background(tmp_path / "gone.safetensors").result(timeout=60)
    _, info = load_sd_checkpoint(tiny_ckpt)
    assert (info.sha256, info.legacy_hash) == expected
    # Hashes the caller started earlier are the ones recorded: the file is not read twice.
    started: Future = Future()
    started.set_result(("a" * 64, "b" * 8))
    _, info = load_sd_checkpoint(tiny_ckpt, hashes=started)
    assert (info.sha256, info.legacy_hash) == ("a" * 64, "b" * 8)

from __future__ import annotations

import copy
import hashlib
import json
import re
import struct
import time

import pytest
import safetensors.torch
import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.apply import apply_lora_file
from lorakit_ext.export.collect import collect_peft_weights
from lorakit_ext.export.metadata import training_metadata
from lorakit_ext.export.writer import (
    ModuleWeights,
    epoch_file_name,
    epoch_from_file_name,
    prune_epoch_files,
    read_lora_file,
    remove_old_epochs,
    write_lora_file,
)
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.families.names import PACKED_QKV
from lorakit_ext.models.families.sd1 import SD1, clip_text_transformer
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.train_config import TrainConfig

# Tiny models on one CPU thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- A1111's name rule, re-implemented from how extensions-builtin/Lora/networks.py states it ----
# (convert_diffusers_name_to_compvis + the `_[qkv]_proj` fallback to the MultiheadAttention).
_A1111_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis_key(key: str, is_sd2: bool) -> str:
    patterns = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", "down"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", "mid"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", "up"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", "downsample"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", "upsample"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", "te"),
    ]
    for pattern, kind in patterns:
        m = re.match(pattern, key)
        if not m:
            continue
        g = m.groups()
        if kind in ("down", "up"):
            block, typ, j, rest = int(g[0]), g[1], int(g[2]), g[3]
            suffix = _A1111_RESNET_SUFFIX.get(rest, rest) if typ == "resnets" else rest
            child = 1 if typ == "attentions" else 0
            index = 1 + 3 * block + j if kind == "down" else 3 * block + j
            return f"diffusion_model_{'input' if kind == 'down' else 'output'}_blocks_{index}_{child}_{suffix}"
        if kind == "mid":
            typ, j, rest = g[0], int(g[1]), g[2]
            suffix = _A1111_RESNET_SUFFIX.get(rest, rest) if typ == "resnets" else rest
            return f"diffusion_model_middle_block_{1 if typ == 'attentions' else 2 * j}_{suffix}"
        if kind == "downsample":
            return f"diffusion_model_input_blocks_{3 + 3 * int(g[0])}_0_op"
        if kind == "upsample":
            b = int(g[0])
            return f"diffusion_model_output_blocks_{2 + 3 * b}_{2 if b > 0 else 1}_conv"
        layer, rest = g
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{layer}_{rest}"
        rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"model_transformer_resblocks_{layer}_{rest}"
    return key


def a1111_layer_mapping(embedder: nn.Module, diffusion_wrapper: nn.Module) -> dict[str, nn.Module]:
    """A1111's network_layer_mapping: text-encoder wrapper and `sd_model.model` names, `.` → `_`."""
    mapping = {name.replace(".", "_"): m for name, m in embedder.named_modules()}
    mapping.update({name.replace(".", "_"): m for name, m in diffusion_wrapper.named_modules()})
    return mapping


def a1111_module(mapping: dict[str, nn.Module], kohya: str, is_sd2: bool) -> nn.Module | None:
    key = a1111_compvis_key(kohya, is_sd2)
    module = mapping.get(key)
    if module is None and re.match(r"(.*)_([qkv]_proj)$", key):
        module = mapping.get(re.match(r"(.*)_([qkv]_proj)$", key).group(1))
    return module


# ---- helpers ------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def roots(model):
    return SD1.component_roots(model)


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500]), cond)


def te_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model.get_learned_conditioning(["a photo of a cat, best quality"])


def random_lora(module: nn.Module, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-zero fp16-representable (down, up) in kohya's shapes for ``module``."""
    g = torch.Generator().manual_seed(seed)
    w = module.weight
    if w.ndim == 4:
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
    else:
        down = torch.randn(rank, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], rank, generator=g)
    return (down * 0.1).half().float(), (up * 0.1).half().float()


def sd15_meta_components():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit_ext.models.ldm_import import import_ldm
    from lorakit_ext.models.sd_configs import clip_l_text_config_dict

    import_ldm()
    # Module names only: on the meta device a full SD1.5 UNet and CLIP-L cost no memory.
    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, legacy=False,
        )
        te = CLIPTextModel(CLIPTextConfig(**clip_l_text_config_dict()))
    return unet, clip_text_transformer(te)


@pytest.fixture
def tiny_sd2_model(tiny_sd2):
    """A fresh tiny SD2 ``LatentDiffusion`` (Linear proj_in/out, OpenCLIP text tower of 2 layers)."""
    model, _ = load_sd_checkpoint(tiny_sd2[0])
    return model


@pytest.fixture(scope="module")
def shared_tiny(tiny_sd15_dir):
    """One tiny SD1.5 model for the tests that only read it (loading takes seconds on a busy CPU)."""
    from lorakit_ext.models.tiny import TINY_NAME

    model, _ = load_sd_checkpoint(tiny_sd15_dir / f"{TINY_NAME}.safetensors", device="cpu", dtype=torch.float32)
    return model


# ---- names and targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("network_type, unet_count, conv3x3", [("LoRA", 192, 0), ("LoCon", 278, 50)])
def test_every_tiny_target_round_trips_and_a1111_finds_the_same_module(shared_tiny, network_type, unet_count, conv3x3):
    model = shared_tiny
    r = roots(model)
    targets = SD1.target_modules(r, network_type)
    assert len(targets["unet"]) == unet_count and len(targets["te"]) == 4 * 6
    assert sum(kind == "conv3x3" for _, kind in targets["unet"]) == conv3x3
    mapping = a1111_layer_mapping(model.cond_stage_model, model.model)
    names = set()
    for component, entries in targets.items():
        for path, kind in entries:
            name = SD1.kohya_name(component, path)
            names.add(name)
            assert SD1.module_path_from_kohya(name) == (component, path)
            module = r[component].get_submodule(path)
            assert a1111_module(mapping, name, is_sd2=False) is module, name
            assert kind == ("linear" if isinstance(module, nn.Linear) else f"conv{module.kernel_size[0]}x{module.kernel_size[1]}")
    assert len(names) == unet_count + 24
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_3_mlp_fc2" in names
    if network_type == "LoCon":
        assert {"lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_down_blocks_2_downsamplers_0_conv",
                "lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_up_blocks_1_resnets_0_conv_shortcut"} <= names


def test_full_sd15_target_counts_match_kohya():
    unet, te = sd15_meta_components()
    lora = SD1.target_modules({"unet": unet, "te": te}, "LoRA")
    assert (len(lora["unet"]), len(lora["te"])) == (192, 72)
    # LoCon adds 22 ResBlocks × (conv1, conv2, time_emb_proj), 14 1×1 shortcuts, 3 down- and 3 upsamplers.
    locon = SD1.target_modules({"unet": unet, "te": te}, "LoCon")
    assert (len(locon["unet"]), len(locon["te"])) == (192 + 22 * 3 + 14 + 6, 72)


def module_a1111_maps(root: nn.Module, path: str, kind: str) -> nn.Module:
    """The module A1111's loader attaches a LoRA target to: q/k/v of an OpenCLIP attention name
    rows of its packed weight, so A1111 maps them to the ``nn.MultiheadAttention``."""
    if kind == "attention" and path.endswith(PACKED_QKV):
        return root.get_submodule(path.rpartition(".")[0])
    return root.get_submodule(path)


def test_sd2_names_round_trip_and_a1111_finds_them(tiny_sd2_model):
    sd = tiny_sd2_model
    r = SD2.component_roots(sd)
    targets = SD2.target_modules(r, "LoCon")
    # Linear proj_in/proj_out in SD2; OpenCLIP's 2 layers train kohya's 6 each: q/k/v/out of the
    # attention (in weight space) and the MLP's 2.
    assert len(targets["unet"]) == 278 and len(targets["te"]) == 2 * 6
    assert sum(kind == "attention" for _, kind in targets["te"]) == 2 * 4
    assert sum(kind == "conv1x1" for _, kind in SD2.target_modules({"unet": r["unet"]}, "LoRA")["unet"]) == 0
    mapping = a1111_layer_mapping(sd.cond_stage_model, sd.model)
    for component, entries in targets.items():
        for path, kind in entries:
            name = SD2.kohya_name(component, path)
            assert SD2.module_path_from_kohya(name) == (component, path)
            assert a1111_module(mapping, name, is_sd2=True) is module_a1111_maps(r[component], path, kind), name
    assert SD2.kohya_name("te", "transformer.resblocks.1.mlp.c_fc") == "lora_te_text_model_encoder_layers_1_mlp_fc1"
    assert SD2.kohya_name("te", "transformer.resblocks.0.attn.out_proj") == "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert SD2.module_path_from_kohya(q) == ("te", "transformer.resblocks.0.attn.q_proj")
    assert a1111_module(mapping, q, is_sd2=True) is r["te"].transformer.resblocks[0].attn


@pytest.mark.parametrize(
    "name",
    [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1",  # not a Linear target
        "lora_unet_down_blocks_0_resnets_2_conv1",  # slot 2 of a down block is its downsampler
        "lora_unet_mid_block_attentions_1_proj_in",
        "lora_te_text_model_encoder_layers_01_mlp_fc1",  # leading zero: would not round-trip
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",  # SDXL
        "lora_unet_input_blocks_4_1_proj_in",  # SDXL's compvis spelling
    ],
)
def test_names_outside_the_mapping_are_refused(name):
    with pytest.raises(ValueError):
        SD1.module_path_from_kohya(name)


# ---- metadata -------------------------------------------------------------------------------------
DESIGN_KEYS = """ss_output_name ss_base_model_version ss_v2 ss_network_module ss_network_dim ss_network_alpha
ss_network_args ss_epoch ss_num_epochs ss_steps ss_learning_rate ss_unet_lr ss_text_encoder_lr ss_lr_scheduler
ss_optimizer ss_num_train_images ss_num_batches_per_epoch ss_batch_size_per_device ss_resolution ss_clip_skip
ss_min_snr_gamma ss_seed ss_sd_model_name ss_sd_model_hash ss_new_sd_model_hash ss_tag_frequency ss_dataset_dirs
ss_bucket_info ss_training_started_at ss_training_finished_at ss_training_comment modelspec.sai_model_spec
modelspec.architecture modelspec.implementation modelspec.title modelspec.resolution modelspec.date
modelspec.prediction_type modelspec.trigger_phrase""".split()


def make_metadata(family=SD1, v=False, **overrides):
    config = TrainConfig(trigger="kat3r1na", training_comment="first try", network_type="LoCon")
    args = dict(
        family=family, v_parameterization=v, output_name="kat-03", epoch=3, num_epochs=10, steps=1890,
        num_train_images=1260, num_batches_per_epoch=630, max_train_steps=6300,
        tag_frequency={"10_kat": {"kat3r1na": 126, "smile": 40}},
        dataset_dirs={"10_kat": {"n_repeats": 10, "img_count": 126}},
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 1260}}, "mean_img_ar_error": 0.0},
        base_model_name="v1-5-pruned-emaonly.safetensors", base_model_hash="6ce0161689",
        base_model_sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        started_at=1_700_000_000.25, finished_at=1_700_000_600.5,
        resolution=512, mixed_precision="bf16",
    )
    args.update(overrides)
    return training_metadata(config, **args)


def test_metadata_has_every_kohya_key_as_strings_in_kohya_formats():
    md = make_metadata()
    assert set(DESIGN_KEYS) <= set(md)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_output_name"] == "kat-03" and md["modelspec.title"] == "kat-03"
    assert md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8.0"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4.0"}
    assert json.loads(md["ss_tag_frequency"]) == {"10_kat": {"kat3r1na": 126, "smile": 40}}
    assert json.loads(md["ss_dataset_dirs"]) == {"10_kat": {"n_repeats": 10, "img_count": 126}}
    assert json.loads(md["ss_bucket_info"])["buckets"]["0"]["count"] == 1260
    assert float(md["ss_training_started_at"]) == 1_700_000_000.25
    assert md["ss_resolution"] == "(512, 512)" and md["modelspec.resolution"] == "512x512"
    assert md["ss_epoch"] == "3" and md["ss_steps"] == "1890" and md["ss_shuffle_caption"] == "True"
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.trigger_phrase"] == "kat3r1na"
    assert md["modelspec.date"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1_700_000_600))
    assert md["ss_training_comment"] == "first try"


@pytest.mark.parametrize(
    "v, arch_id, prediction", [(False, "stable-diffusion-v2-512/lora", "epsilon"), (True, "stable-diffusion-v2-768-v/lora", "v")]
)
def test_sd2_metadata_is_recognised_as_sd2(v, arch_id, prediction):
    md = make_metadata(family=SD2, v=v, resolution=(768, 640), bucket_info=None)
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2"  # A1111 checks ss_v2 == "True"
    assert md["modelspec.architecture"] == arch_id and md["modelspec.prediction_type"] == prediction
    assert md["modelspec.resolution"] == "768x640" and md["ss_bucket_info"] == "null"


@pytest.mark.parametrize("used", ["bf16", "fp16", "no"])
def test_mixed_precision_is_the_one_the_run_used_not_the_option(used):
    # The option defaults to "auto"; kohya's readers expect what autocast really ran in.
    assert TrainConfig().mixed_precision == "auto"
    assert make_metadata(mixed_precision=used)["ss_mixed_precision"] == used


def test_unknown_model_hashes_are_left_out():
    md = make_metadata(base_model_hash=None, base_model_sha256=None)
    assert "ss_sd_model_hash" not in md and "ss_new_sd_model_hash" not in md
    assert md["ss_sd_model_name"] == "v1-5-pruned-emaonly.safetensors"


# ---- the file -------------------------------------------------------------------------------------
def some_modules(width=64) -> list[ModuleWeights]:
    g = torch.Generator().manual_seed(0)
    return [
        ModuleWeights("lora_unet_down_blocks_0_attentions_0_proj_in", torch.randn(4, width, 1, 1, generator=g), torch.randn(width, 4, 1, 1, generator=g), 2.0),
        ModuleWeights("lora_te_text_model_encoder_layers_0_self_attn_q_proj", torch.randn(4, width, generator=g), torch.randn(width, 4, generator=g), 2.0),
        ModuleWeights("lora_unet_down_blocks_0_resnets_0_conv1", torch.randn(2, width, 3, 3, generator=g), torch.randn(width, 2, 1, 1, generator=g), 1.0),
    ]


def test_written_file_has_kohya_keys_fp16_scalar_alpha_and_its_own_stem(tmp_path):
    path = tmp_path / "kat-03.safetensors"
    written = write_lora_file(path, some_modules(), {**make_metadata(), "ss_output_name": "kat"})
    tensors, metadata = read_lora_file(path)
    expected = {f"{m.kohya_name}.{part}" for m in some_modules() for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].shape == ()
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 64, 3, 3)
    assert torch.equal(tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"], some_modules()[1].up.half())
    assert metadata["ss_output_name"] == "kat-03"  # the stem, not the name passed in
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata == written.metadata and all(isinstance(v, str) for v in metadata.values())
    assert written.num_modules == 3 and not list(tmp_path.glob(".*.tmp"))


def test_model_hash_is_the_sha256_after_the_header_and_legacy_hash_is_kohyas(tmp_path):
    path = tmp_path / "big.safetensors"
    # Over 1.1 MiB, so the legacy hash reads real tensor bytes.
    write_lora_file(path, some_modules(width=40_000), make_metadata())
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    _, metadata = read_lora_file(path)
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length :]).hexdigest()
    # kohya: serialise the tensors with only the ss_* metadata, hash 64 KiB at 1 MiB, keep 8 hex digits.
    tensors, _ = read_lora_file(path)
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    kohya_bytes = safetensors.torch.save(tensors, metadata=ss_only)
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_bad_module_shapes_are_refused(tmp_path):
    good = some_modules()[1]
    with pytest.raises(ValueError, match="ranks differ"):
        write_lora_file(tmp_path / "x.safetensors", [ModuleWeights(good.kohya_name, good.down, good.up[:, :3], 2.0)], {})
    with pytest.raises(ValueError, match="twice"):
        write_lora_file(tmp_path / "x.safetensors", [good, good], {})
    assert not (tmp_path / "x.safetensors").exists()


def test_reading_a_broken_file_says_so(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_lora_file(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")


# ---- epoch files ----------------------------------------------------------------------------------
def test_epoch_file_names():
    assert [epoch_file_name("kat", e) for e in (1, 9, 10, 99, 100, 123)] == [
        "kat-01.safetensors", "kat-09.safetensors", "kat-10.safetensors", "kat-99.safetensors",
        "kat-100.safetensors", "kat-123.safetensors",
    ]
    assert all(epoch_from_file_name(epoch_file_name("kat", e), "kat") == e for e in range(1, 120))
    for other in ("kat-gen0.safetensors", "kat-1.safetensors", "kat-001.safetensors", "kat-01.ckpt", "kat2-01.safetensors"):
        assert epoch_from_file_name(other, "kat") is None
    with pytest.raises(ValueError):
        epoch_file_name("kat", 0)


@pytest.fixture
def lora_dir_with_runs(tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    ours = [lora / epoch_file_name("kat", e) for e in range(1, 6)]
    others = [lora / "kat-06.safetensors", lora / "kat-gen0.safetensors", lora / "kat-gen0-01.safetensors", lora / "katx-01.safetensors"]
    for p in ours + others:
        p.write_bytes(p.name.encode())
    return lora, ours, others


def test_pruning_keeps_this_runs_newest_and_never_touches_other_files(lora_dir_with_runs):
    lora, ours, others = lora_dir_with_runs
    # Written out of order, and kat-06 belongs to another run: it must not count as "newest".
    written = [ours[3], ours[0], ours[4], ours[1], ours[2]]
    assert prune_epoch_files(lora, "kat", 2, written) == ours[:3]
    assert prune_epoch_files(lora, "kat", 5, written) == []
    assert prune_epoch_files(lora, "kat", 0, written) == []
    assert all(p.exists() for p in ours + others)  # pruning only decides
    # A file this run wrote that is gone (the user deleted it) is not a candidate.
    ours[0].unlink()
    assert prune_epoch_files(lora, "kat", 2, written) == ours[1:3]


def test_remove_old_epochs_moves_them_to_the_project_trash_and_undo_restores(lora_dir_with_runs, tmp_path):
    from lorakit_ext.dataset.trash import undo
    from lorakit_ext.project import create_project

    lora, ours, others = lora_dir_with_runs
    project = create_project(tmp_path / "projects", "kat")
    batch = remove_old_epochs(project, lora, "kat", 3, ours)
    assert [p.exists() for p in ours] == [False, False, True, True, True]
    assert all(p.exists() for p in others)
    assert batch.folder.parent == project.removed
    assert remove_old_epochs(project, lora, "kat", 3, ours) is None
    undo(project, allowed_bases=[lora])
    assert all(p.read_bytes() == p.name.encode() for p in ours)


# ---- merging ---------------------------------------------------------------------------------------
def test_apply_merges_exactly_like_merging_by_hand(tiny_sd15, tmp_path):
    model, _ = tiny_sd15
    base_unet, base_te = unet_out(model), te_out(model)
    by_hand = copy.deepcopy(model)
    r, hand = roots(model), roots(by_hand)
    chosen = [
        ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", 4, 2.0),  # Linear
        ("unet", "middle_block.1.proj_in", 4, 8.0),  # 1×1 conv in SD1
        ("unet", "output_blocks.3.0.in_layers.2", 2, 1.0),  # 3×3 conv (LoCon)
        ("te", "encoder.layers.1.self_attn.v_proj", 4, 3.0),
        ("te", "encoder.layers.2.mlp.fc1", 8, 4.0),
    ]
    modules = []
    multiplier = 0.7
    for seed, (component, path, rank, alpha) in enumerate(chosen):
        down, up = random_lora(r[component].get_submodule(path), rank, seed)
        modules.append(ModuleWeights(SD1.kohya_name(component, path), down, up, alpha))
        target = hand[component].get_submodule(path)
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            # kohya's merge of a 3×3 LoRA: the 1×1 up conv applied to the down kernel.
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(target.weight.shape)
        with torch.no_grad():
            target.weight += multiplier * alpha / rank * delta
    path = tmp_path / "hand.safetensors"
    write_lora_file(path, modules, {})
    assert apply_lora_file(model, path, SD1, multiplier=multiplier) == len(chosen)
    merged_unet, merged_te = unet_out(model), te_out(model)
    assert rel(merged_unet, unet_out(by_hand)) < 1e-5 and rel(merged_te, te_out(by_hand)) < 1e-5
    assert rel(merged_unet, base_unet) > 1e-3 and rel(merged_te, base_te) > 1e-3


def test_apply_refuses_unknown_keys_and_changes_nothing(tiny_sd15, tmp_path):
    model, _ = tiny_sd15
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = some_modules(width=32)[1]  # layer 0 q_proj exists in the tiny text encoder
    bogus = [
        ModuleWeights("lora_te_text_model_encoder_layers_7_mlp_fc1", good.down, good.up, 2.0),  # only 4 layers
        ModuleWeights("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q", good.down, good.up, 2.0),
    ]
    path = tmp_path / "bogus.safetensors"
    write_lora_file(path, [good, *bogus], {})
    with pytest.raises(UserError) as exc:
        apply_lora_file(model, path, SD1)
    assert "lora_te_text_model_encoder_layers_7_mlp_fc1" in str(exc.value)
    assert "attn9_to_q" in str(exc.value) and "self_attn_q_proj" not in str(exc.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_apply_sd2_packed_qkv_goes_into_the_right_third_of_in_proj(tiny_sd2_model, tmp_path):
    sd = tiny_sd2_model
    attn = sd.cond_stage_model.model.transformer.resblocks[1].attn
    before = attn.in_proj_weight.detach().clone()
    modules, expected = [], before.clone()
    for i, which in enumerate("qkv"):
        down, up = random_lora(nn.Linear(32, 32), 4, i)
        modules.append(ModuleWeights(f"lora_te_text_model_encoder_layers_1_self_attn_{which}_proj", down, up, 2.0))
        expected[32 * i : 32 * (i + 1)] += 0.5 * (up @ down)
    path = tmp_path / "sd2.safetensors"
    write_lora_file(path, modules, {})
    assert apply_lora_file(sd, path, SD2) == 3
    assert torch.allclose(attn.in_proj_weight, expected, atol=1e-6)
    assert not torch.equal(attn.in_proj_weight, before)


def test_export_proof_peft_model_and_merged_file_agree(tiny_sd15, tmp_path):
    """Train-time peft model (unmerged) ≡ base model + our file merged by A1111's rule."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    trained, _ = tiny_sd15
    fresh = copy.deepcopy(trained)
    base_unet, base_te = unet_out(trained), te_out(trained)
    r = roots(trained)
    targets = SD1.target_modules(r, "LoCon")
    g = torch.Generator().manual_seed(11)
    for component, entries in targets.items():
        config = LoraConfig(r=4, lora_alpha=2, target_modules=[p for p, _ in entries])
        inject_adapter_in_model(config, r[component])
        for layer in r[component].modules():
            if isinstance(layer, LoraLayer):
                with torch.no_grad():
                    for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                        # fp16-representable, so the fp16 file holds exactly what peft computes with.
                        weight.copy_((torch.randn(weight.shape, generator=g) * 0.05).half().float())
    modules = [m for c in ("unet", "te") for m in collect_peft_weights(r[c], c, SD1, lambda _path: 2.0)]
    assert len(modules) == 278 + 24
    path = tmp_path / "proof-01.safetensors"
    write_lora_file(path, modules, make_metadata(output_name="proof-01"))

    apply_lora_file(fresh, path, SD1)
    expected_unet, expected_te = unet_out(trained), te_out(trained)
    assert rel(expected_unet, base_unet) > 1e-2 and rel(expected_te, base_te) > 1e-2
    assert rel(unet_out(fresh), expected_unet) < 1e-4
    assert rel(te_out(fresh), expected_te) < 1e-4


def test_collect_refuses_a_scale_the_file_cannot_express(shared_tiny):
    from peft import LoraConfig, inject_adapter_in_model

    te = copy.deepcopy(roots(shared_tiny)["te"])
    path = "encoder.layers.0.mlp.fc1"
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=[path]), te)
    with pytest.raises(ValueError, match="rsLoRA"):
        collect_peft_weights(te, "te", SD1, lambda _path: 2.0)

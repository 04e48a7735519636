"""SDXL's family: kohya's names both ways, A1111's reading of them, file refusals, metadata, presets.

The naming table needs nothing but strings. The model tests build sgm's own ``DiffusionEngine`` at
tiny widths (``tests/tiny_sdxl.py``; skipped without ``LORAKIT_SGM_DIR``). ``LORAKIT_SDXL_LORA``
may name a kohya-format SDXL LoRA for SDXL base's layout, e.g. one the a1111 harness writes with
``make_tiny_sdxl.py --lora NAME``: its keys are checked against ours and merged into the tiny model.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.apply import apply_lora_file
from lorakit_ext.export.card import sd_version_of
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.families import FAMILIES, detect_family
from lorakit_ext.models.families.base import UNET_INPUT_KEY
from lorakit_ext.models.families.names import PACKED_QKV
from lorakit_ext.models.families.sdxl import ADM_KEY, BASE_TEXT_KEY, SDXL
from lorakit_ext.train_config import NETWORK_TYPES
from test_export import make_metadata, module_a1111_maps

# Names as kohya's sdxl_train_network.py writes them (and the harness's LoRAs have them) ↔ module paths.
KNOWN_NAMES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", "unet", "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0", "unet", "middle_block.1.transformer_blocks.9.attn2.to_out.0"),
    ("lora_unet_middle_block_1_proj_in", "unet", "middle_block.1.proj_in"),
    ("lora_unet_output_blocks_5_1_proj_out", "unet", "output_blocks.5.1.proj_out"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2", "unet", "output_blocks.0.1.transformer_blocks.3.ff.net.2"),
    # LoCon: ResBlock layers, the downsampler's op, the upsampler's conv.
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "input_blocks.1.0.in_layers.2"),
    ("lora_unet_input_blocks_4_0_skip_connection", "unet", "input_blocks.4.0.skip_connection"),
    ("lora_unet_input_blocks_3_0_op", "unet", "input_blocks.3.0.op"),
    ("lora_unet_middle_block_0_emb_layers_1", "unet", "middle_block.0.emb_layers.1"),
    ("lora_unet_output_blocks_2_2_conv", "unet", "output_blocks.2.2.conv"),
    ("lora_unet_output_blocks_8_0_out_layers_3", "unet", "output_blocks.8.0.out_layers.3"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1", "encoder.layers.0.self_attn.q_proj"),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", "te1", "encoder.layers.11.mlp.fc2"),
    # te2 is OpenCLIP, named as HF CLIP: q/k/v are thirds of the packed in_proj_weight.
    ("lora_te2_text_model_encoder_layers_31_self_attn_k_proj", "te2", "transformer.resblocks.31.attn.k_proj"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "te2", "transformer.resblocks.0.attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_7_mlp_fc1", "te2", "transformer.resblocks.7.mlp.c_fc"),
    ("lora_te2_text_model_encoder_layers_7_mlp_fc2", "te2", "transformer.resblocks.7.mlp.c_proj"),
]


@pytest.mark.parametrize("name, component, path", KNOWN_NAMES, ids=[name for name, _, _ in KNOWN_NAMES])
def test_kohya_sdxl_names_map_both_ways_on_strings(name, component, path):
    assert SDXL.kohya_name(component, path) == name
    assert SDXL.module_path_from_kohya(name) == (component, path)


@pytest.mark.parametrize(
    "name",
    [
        "lora_unet_down_blocks_1_attentions_0_proj_in",  # SD1/SD2's diffusers spelling
        "lora_te_text_model_encoder_layers_0_mlp_fc1",  # SD1/SD2's one text encoder
        "lora_unet_input_blocks_4_1_transformer_blocks_0_norm1",  # not a Linear target
        "lora_unet_input_blocks_04_1_proj_in",  # leading zero: would not round-trip
        "lora_unet_time_embed_0",  # kohya trains no time or label embedding
        "lora_te2_text_model_encoder_layers_0_self_attn_in_proj",
    ],
)
def test_names_outside_kohyas_sdxl_set_are_refused(name):
    with pytest.raises(ValueError):
        SDXL.module_path_from_kohya(name)


@pytest.mark.parametrize(
    "component, path",
    [("unet", "label_emb.0.0"), ("unet", "input_blocks.0.0"), ("te1", "embeddings.token_embedding"), ("te2", "transformer.resblocks.0.attn")],
)
def test_modules_kohya_does_not_name_have_no_sdxl_name(component, path):
    with pytest.raises(ValueError):
        SDXL.kohya_name(component, path)


# ---- files ------------------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "xl.safetensors"
    atomic_write_bytes(path, save(tensors))
    return path


def test_refiner_and_inpainting_files_are_refused_by_name(tmp_path):
    # The refiner's one text encoder is embedder 0 (renamed to SD2's keys on reading); its vector is 2560 wide.
    refiner = {UNET_INPUT_KEY: torch.zeros(384, 4, 3, 3), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1280),
               ADM_KEY: torch.zeros(8, 2560)}
    with pytest.raises(UserError, match="xl.safetensors is the SDXL refiner, which LoRAs are not trained on"):
        load_sd_checkpoint(_checkpoint(tmp_path, refiner))
    inpainting = {UNET_INPUT_KEY: torch.zeros(320, 9, 3, 3), BASE_TEXT_KEY: torch.zeros(1280), ADM_KEY: torch.zeros(8, 2816)}
    with pytest.raises(UserError, match=r"xl.safetensors is an SDXL inpainting model \(9 UNet input channels\)"):
        load_sd_checkpoint(_checkpoint(tmp_path, inpainting))
    base = {**inpainting, UNET_INPUT_KEY: torch.zeros(320, 4, 3, 3)}
    assert [f for f in FAMILIES if f.claims(base)] == [SDXL]
    SDXL.check_standard_widths(base, Path("xl.safetensors"))
    assert detect_family(base, Path("xl.safetensors")) is SDXL


def test_a_loaded_refiner_has_no_sdxl_roots():
    refiner = nn.Module()
    refiner.conditioner = nn.Module()
    refiner.conditioner.embedders = nn.ModuleList([nn.Module()])
    with pytest.raises(UserError, match="is it the refiner"):
        SDXL.component_roots(refiner)


# ---- metadata and settings ----------------------------------------------------------------------
@pytest.mark.parametrize("v", [False, True])
def test_metadata_is_kohyas_sdxl_metadata(v):
    md = make_metadata(family=SDXL, v=v, resolution=1024)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    # sai_model_spec has no v-prediction SDXL architecture: the prediction type says it.
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["modelspec.resolution"] == "1024x1024" and SDXL.resolution(v) == 1024
    assert sd_version_of(md) == "SDXL" == SDXL.sd_version


def test_presets_are_kohya_colabs_xl_settings():
    config = SDXL.train_config()
    assert (config.resolution, config.network_dim, config.network_alpha, config.train_batch_size) == (1024, 8, 4.0, 4)
    assert (config.unet_lr, config.text_encoder_lr, config.min_snr_gamma, config.clip_skip) == (3e-4, 6e-5, 8.0, 1)
    locon = SDXL.train_config("kohya-colab XL LoCon")
    assert (locon.network_type, locon.network_dim, locon.network_alpha, locon.conv_dim, locon.conv_alpha) == ("LoCon", 16, 8.0, 16, 8.0)
    assert SDXL.train_config("UNet only").text_encoder_lr == 0


# ---- on sgm's model, as A1111 reads the names ----------------------------------------------------
def a1111_layer_mapping(sd_model: nn.Module) -> dict[str, nn.Module]:
    """A1111 v1.10.1's ``network_layer_mapping`` of an SDXL model (networks.py,
    ``assign_network_names_to_compvis_modules``): each text embedder's modules as ``{i}_{path}``,
    ``sd_model.model``'s as their path, ``.`` → ``_``. A1111 maps the embedders it wraps (the two
    text encoders) through ``.wrapped``; the tiny model's are unwrapped."""
    mapping = {}
    for i, embedder in enumerate(sd_model.conditioner.embedders[:2]):
        mapping.update({f"{i}_{name}".replace(".", "_"): m for name, m in embedder.named_modules()})
    mapping.update({name.replace(".", "_"): m for name, m in sd_model.model.named_modules()})
    return mapping


def a1111_module(mapping: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module A1111's ``load_network`` finds for a kohya SDXL module name."""
    key = name
    m = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:  # convert_diffusers_name_to_compvis: te2 layers to OpenCLIP's resblock names
        leaf = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{m[1]}_{leaf}"
    module = mapping.get(key)
    qkv = re.fullmatch(r"(.*)_([qkv]_proj)", key)
    if module is None and qkv:  # a packed q/k/v names its MultiheadAttention
        module = mapping.get(qkv[1])
    if module is None and "lora_unet" in name:
        module = mapping.get(name.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in name:
        module = mapping.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def _te2_packed_names() -> list[str]:
    return [SDXL.kohya_name("te2", f"transformer.resblocks.{i}.{leaf}") for i in range(32) for leaf in PACKED_QKV]


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_a1111_finds_the_module_of_every_name_we_write(tiny_sdxl, network_type):
    roots = SDXL.component_roots(tiny_sdxl)
    mapping = a1111_layer_mapping(tiny_sdxl)
    targets = SDXL.target_modules(roots, network_type)
    for component, entries in targets.items():
        for path, kind in entries:
            assert a1111_module(mapping, SDXL.kohya_name(component, path)) is module_a1111_maps(roots[component], path, kind)
    for name in _te2_packed_names():
        _, path = SDXL.module_path_from_kohya(name)
        assert isinstance(a1111_module(mapping, name), nn.MultiheadAttention)
        assert a1111_module(mapping, name) is roots["te2"].get_submodule(path.rpartition(".")[0])


def test_lora_targets_are_kohyas_full_sdxl_set(tiny_sdxl):
    # kohya's SDXL LoRA: 722 UNet modules (70 transformer blocks × 10 Linears + 22 proj_in/out), 6 per
    # CLIP-L layer (12) and per bigG layer (32): bigG's q/k/v/out train in weight space, as its
    # attention reads the packed weights directly.
    targets = SDXL.target_modules(SDXL.component_roots(tiny_sdxl), "LoRA")
    assert {component: len(entries) for component, entries in targets.items()} == {"unet": 722, "te1": 72, "te2": 192}
    assert len(_te2_packed_names()) == 96


def test_a_kohya_sdxl_lora_names_our_modules_and_merges(tiny_sdxl):
    lora = os.environ.get("LORAKIT_SDXL_LORA")
    if not lora:
        pytest.skip("no kohya-format SDXL LoRA given; set LORAKIT_SDXL_LORA (make_tiny_sdxl.py --lora writes one)")
    tensors, metadata = read_lora_file(Path(lora))
    names = {key.partition(".")[0] for key in tensors}
    roots = SDXL.component_roots(tiny_sdxl)
    ours = {SDXL.kohya_name(c, p) for c, entries in SDXL.target_modules(roots, "LoRA").items() for p, _ in entries}
    locon = {SDXL.kohya_name(c, p) for c, entries in SDXL.target_modules(roots, "LoCon").items() for p, _ in entries}
    # Every module kohya's LoRA has is one we train; the rest are LoCon's convs.
    assert set(_te2_packed_names()) <= ours <= names and names - ours <= locon
    assert sd_version_of(metadata) == "SDXL"
    model = copy.deepcopy(tiny_sdxl)
    assert apply_lora_file(model, Path(lora), SDXL) == len(names)


def test_a_yaml_as_a1111_reads_it_builds_headless(tmp_path):
    """A1111 builds such a yaml (the a1111 harness's tiny SDXL): its sampler_config registers the bigG
    architecture with open_clip, which sgm instantiates before the text encoders, and it asks for
    xformers' attention, which A1111 replaces by the standard blocks."""
    import json

    from tiny_sdxl import build_tiny_sdxl, tiny_sdxl_config

    config = tiny_sdxl_config(tmp_path)
    params = config["model"]["params"]
    big_g = params["conditioner_config"]["params"]["emb_models"][1]["params"]
    import open_clip

    arch = f"yaml-registered-{tmp_path.name}"
    (tmp_path / f"{arch}.json").write_text(json.dumps(open_clip.get_model_config(big_g["arch"])))
    assert open_clip.get_model_config(arch) is None
    big_g["arch"] = arch
    params["sampler_config"] = {"target": "open_clip.add_model_config", "params": {"path": str(tmp_path / f"{arch}.json")}}
    # sgm's own sd_xl_base.yaml asks for xformers' attention, which A1111 turns off.
    params["network_config"]["params"]["spatial_transformer_attn_type"] = "softmax-xformers"
    params["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"
    model = build_tiny_sdxl(tmp_path, config=config)
    assert model.conditioner.embedders[1].model.transformer.width == 64
    from sgm.modules.attention import CrossAttention
    from sgm.modules.diffusionmodules.model import AttnBlock

    assert type(model.first_stage_model.encoder.mid.attn_1) is AttnBlock
    attentions = [m for m in model.model.diffusion_model.modules() if "Attention" in type(m).__name__]
    assert attentions and all(type(m) is CrossAttention for m in attentions)
    latents = model.encode_first_stage(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()

"""Kohya module-name spellings that several families share, both ways, pure on strings.

A kohya name is a prefix (``lora_unet_``, ``lora_te_``…) plus a module path with ``.`` → ``_``,
but the path is not always the model's own:

- SD1/SD2's UNet is ldm's ``UNetModel`` (``input_blocks.4.1.…``) while kohya spells it the
  diffusers way (``down_blocks_1_attentions_0_…``). The mapping is the one A1111 undoes in
  ``convert_diffusers_name_to_compvis``; like A1111 it assumes SD's UNet layout: four levels of two
  ResBlocks each, a downsampler after each of the first three levels, three output blocks per
  level, and no attention in the lowest level (so the first upsampler is child 1, not 2).
- SDXL's UNet is sgm's ``UNetModel``, which kohya spells by its own (compvis) names
  (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as A1111 reads them back.
- Text-encoder layers are spelled the HF-CLIP way (``text_model_encoder_layers_0_self_attn_q_proj``)
  whatever the encoder is; each family maps its own module paths onto :data:`CLIP_LEAVES`.

Anything outside the mapped set raises ``ValueError``, so a round trip is exact.
"""

from __future__ import annotations

import re

# A number without leading zeros, so "layers_01" is rejected instead of turning into "layers_1".
NUMBER = r"(0|[1-9][0-9]*)"

# ---- text encoders ------------------------------------------------------------------------------
# The Linear layers of one CLIP encoder layer that kohya trains, in HF CLIP's spelling.
CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_CLIP_LEAVES_BY_KOHYA = {leaf.replace(".", "_"): leaf for leaf in CLIP_LEAVES}
# OpenCLIP packs q/k/v into one ``attn.in_proj_weight``: these paths name its thirds, not modules
# (A1111 resolves them the same way, through the parent ``MultiheadAttention``).
PACKED_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def clip_layer_name(layer: str, leaf: str) -> str:
    """The kohya name (without prefix) of ``leaf`` (one of :data:`CLIP_LEAVES`) in encoder layer ``layer``."""
    if leaf not in CLIP_LEAVES:
        raise ValueError(f"{leaf!r} is not a text-encoder LoRA target")
    return f"text_model_encoder_layers_{layer}_{leaf.replace('.', '_')}"


def parse_clip_layer_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`clip_layer_name`: ``(layer, leaf)``."""
    m = re.fullmatch(rf"text_model_encoder_layers_{NUMBER}_(.+)", name)
    if not m or m[2] not in _CLIP_LEAVES_BY_KOHYA:
        raise ValueError(f"{name!r} names no text-encoder module")
    return m[1], _CLIP_LEAVES_BY_KOHYA[m[2]]


def hf_clip_name(path: str) -> str:
    """The kohya name of a module path in HF ``CLIPTextModel``'s ``text_model`` (SD1's and SDXL's CLIP-L)."""
    m = re.fullmatch(rf"encoder\.layers\.{NUMBER}\.(.+)", path)
    if not m or m[2] not in CLIP_LEAVES:
        raise ValueError(f"CLIP text-encoder module {path!r} has no kohya name")
    return clip_layer_name(m[1], m[2])


def hf_clip_path(name: str) -> str:
    """Inverse of :func:`hf_clip_name`."""
    layer, leaf = parse_clip_layer_name(name)
    return f"encoder.layers.{layer}.{leaf}"


# kohya spells OpenCLIP's layers (SD2's ViT-H, SDXL's bigG) as HF CLIP's; OpenCLIP's resblock leaf for each.
_OPEN_CLIP_LEAVES = dict(zip(CLIP_LEAVES, (*PACKED_QKV, "attn.out_proj", "mlp.c_fc", "mlp.c_proj")))
_KOHYA_LEAVES = {open_clip: kohya for kohya, open_clip in _OPEN_CLIP_LEAVES.items()}


def open_clip_name(path: str) -> str:
    """The kohya name of a module path in an OpenCLIP model (``transformer.resblocks.N.…``), the
    way A1111 maps it back: q/k/v name thirds of the packed ``attn.in_proj_weight`` (:data:`PACKED_QKV`)."""
    m = re.fullmatch(rf"transformer\.resblocks\.{NUMBER}\.(.+)", path)
    if not m or m[2] not in _KOHYA_LEAVES:
        raise ValueError(f"OpenCLIP text-encoder module {path!r} has no kohya name")
    return clip_layer_name(m[1], _KOHYA_LEAVES[m[2]])


def open_clip_path(name: str) -> str:
    """Inverse of :func:`open_clip_name`."""
    layer, leaf = parse_clip_layer_name(name)
    return f"transformer.resblocks.{layer}.{_OPEN_CLIP_LEAVES[leaf]}"


# ---- SD1/SD2's UNet, the diffusers way --------------------------------------------------------------
# ldm ResBlock child → diffusers ResnetBlock2D child.
_RESNET = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}

# The Linear layers of one BasicTransformerBlock; ldm and diffusers spell them alike.
_BLOCK_LEAVES = {
    leaf.replace(".", "_"): leaf
    for leaf in [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["ff.net.0.proj", "ff.net.2"]
}


def _upsampler_child(up: int) -> int:
    # Up-block 0 (the lowest level) has [ResBlock, Upsample]; the others [ResBlock, SpatialTransformer, Upsample].
    return 1 if up == 0 else 2


def _attention_leaf(rest: str) -> str:
    if rest in ("proj_in", "proj_out"):
        return rest
    m = re.fullmatch(rf"transformer_blocks\.{NUMBER}\.(.+)", rest)
    if m and m[2].replace(".", "_") in _BLOCK_LEAVES:
        return f"transformer_blocks_{m[1]}_{m[2].replace('.', '_')}"
    raise ValueError(f"{rest!r} is not a LoRA target inside a transformer block")


def _attention_leaf_back(rest: str) -> str:
    if rest in ("proj_in", "proj_out"):
        return rest
    m = re.fullmatch(rf"transformer_blocks_{NUMBER}_(.+)", rest)
    if m and m[2] in _BLOCK_LEAVES:
        return f"transformer_blocks.{m[1]}.{_BLOCK_LEAVES[m[2]]}"
    raise ValueError(f"{rest!r} is not a LoRA target inside a transformer block")


def _resnet_leaf(rest: str) -> str:
    if rest not in _RESNET:
        raise ValueError(f"{rest!r} is not a Linear/Conv2d of a ResBlock")
    return _RESNET[rest]


def _resnet_leaf_back(rest: str) -> str:
    if rest not in _RESNET_BACK:
        raise ValueError(f"{rest!r} is not a Linear/Conv2d of a ResBlock")
    return _RESNET_BACK[rest]


def _block_part(child: int, slot: int, rest: str) -> str:
    """``resnets_<slot>_…`` or ``attentions_<slot>_…`` for child 0 (ResBlock) or 1 (SpatialTransformer)."""
    if child == 0:
        return f"resnets_{slot}_{_resnet_leaf(rest)}"
    if child == 1:
        return f"attentions_{slot}_{_attention_leaf(rest)}"
    raise ValueError(f"child {child} of an SD1/SD2 UNet block is neither its ResBlock nor its transformer")


def _block_path(block_type: str, rest: str) -> tuple[int, str]:
    if block_type == "resnets":
        return 0, _resnet_leaf_back(rest)
    return 1, _attention_leaf_back(rest)


def sd_unet_name(path: str) -> str:
    """The diffusers-spelled kohya name (without prefix) of an ldm SD1/SD2 UNet module path."""
    m = re.fullmatch(rf"input_blocks\.{NUMBER}\.{NUMBER}\.(.+)", path)
    if m and int(m[1]) >= 1:
        level, slot = divmod(int(m[1]) - 1, 3)
        if slot < 2:
            return f"down_blocks_{level}_{_block_part(int(m[2]), slot, m[3])}"
        if m[2] == "0" and m[3] == "op":
            return f"down_blocks_{level}_downsamplers_0_conv"
    m = re.fullmatch(r"middle_block\.([012])\.(.+)", path)
    if m:
        index = int(m[1])
        if index == 1:
            return f"mid_block_attentions_0_{_attention_leaf(m[2])}"
        return f"mid_block_resnets_{index // 2}_{_resnet_leaf(m[2])}"
    m = re.fullmatch(rf"output_blocks\.{NUMBER}\.{NUMBER}\.(.+)", path)
    if m:
        up, slot = divmod(int(m[1]), 3)
        if m[3] == "conv" and slot == 2 and int(m[2]) == _upsampler_child(up):
            return f"up_blocks_{up}_upsamplers_0_conv"
        return f"up_blocks_{up}_{_block_part(int(m[2]), slot, m[3])}"
    raise ValueError(f"UNet module {path!r} has no kohya name")


def sd_unet_path(name: str) -> str:
    """Inverse of :func:`sd_unet_name`: the ldm module path."""
    m = re.fullmatch(rf"down_blocks_{NUMBER}_downsamplers_0_conv", name)
    if m:
        return f"input_blocks.{3 + 3 * int(m[1])}.0.op"
    m = re.fullmatch(rf"up_blocks_{NUMBER}_upsamplers_0_conv", name)
    if m:
        up = int(m[1])
        return f"output_blocks.{2 + 3 * up}.{_upsampler_child(up)}.conv"
    m = re.fullmatch(rf"down_blocks_{NUMBER}_(resnets|attentions)_([01])_(.+)", name)
    if m:
        child, leaf = _block_path(m[2], m[4])
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[3])}.{child}.{leaf}"
    m = re.fullmatch(r"mid_block_(resnets_[01]|attentions_0)_(.+)", name)
    if m:
        block_type, slot = m[1].rsplit("_", 1)
        _, leaf = _block_path(block_type, m[2])
        return f"middle_block.{1 if block_type == 'attentions' else 2 * int(slot)}.{leaf}"
    m = re.fullmatch(rf"up_blocks_{NUMBER}_(resnets|attentions)_([012])_(.+)", name)
    if m:
        child, leaf = _block_path(m[2], m[4])
        return f"output_blocks.{3 * int(m[1]) + int(m[3])}.{child}.{leaf}"
    raise ValueError(f"{name!r} names no SD1/SD2 UNet module")


# ---- SDXL's UNet, ldm/sgm's own names ---------------------------------------------------------------
# Leaves kohya trains outside transformer blocks: ResBlock layers, Downsample's ``op``, Upsample's ``conv``.
_SGM_LEAVES = {leaf.replace(".", "_"): leaf for leaf in (*_RESNET, "op", "conv")}


def sgm_unet_name(path: str) -> str:
    """The kohya name (without prefix) of an sgm UNet module path: the path with ``.`` → ``_``,
    for the modules kohya can target."""
    m = re.fullmatch(rf"(?P<block>(?:input|output)_blocks\.{NUMBER}|middle_block)\.(?P<child>{NUMBER})\.(?P<leaf>.+)", path)
    if m and m["leaf"] in _SGM_LEAVES.values():
        return path.replace(".", "_")
    if m:
        return f"{m['block'].replace('.', '_')}_{m['child']}_{_attention_leaf(m['leaf'])}"
    raise ValueError(f"UNet module {path!r} has no kohya name")


def sgm_unet_path(name: str) -> str:
    """Inverse of :func:`sgm_unet_name`."""
    # The block and child numbers end at the first "_" after them, so the split is unambiguous.
    m = re.fullmatch(rf"(?P<block>(?:input|output)_blocks_{NUMBER}|middle_block)_(?P<child>{NUMBER})_(?P<leaf>.+)", name)
    if not m:
        raise ValueError(f"{name!r} names no SDXL UNet module")
    leaf = _SGM_LEAVES.get(m["leaf"]) or _attention_leaf_back(m["leaf"])
    return f"{m['block'].replace('blocks_', 'blocks.')}.{m['child']}.{leaf}"

"""Kohya LoRA module names for SD1/SD2, both ways, and the modules kohya's ``networks.lora`` trains.

A kohya name is ``lora_unet_``/``lora_te_`` plus a module path with ``.`` → ``_``. For SD1/SD2 that
path is spelled the diffusers way (``down_blocks_1_attentions_0_…``) and, for the text encoder, the
HF-CLIP way (``text_model_encoder_layers_0_self_attn_q_proj``), while the model we train is ldm's
``UNetModel`` (``input_blocks.4.1.…``) with HF CLIP (SD1) or OpenCLIP (SD2). The mapping is the one
A1111 undoes in ``convert_diffusers_name_to_compvis``; like A1111 it assumes SD1/SD2's UNet layout:
four levels of two ResBlocks each, a downsampler after each of the first three levels, three output
blocks per level, and no attention in the lowest level (so the first upsampler is child 1, not 2).

Every function here is pure on strings except :func:`target_modules`, which only reads module names
and classes. Anything outside the mapped set raises ``ValueError``, so a round trip is exact.
"""

from __future__ import annotations

import re

from torch import nn

from lorakit_ext.errors import UserError

ARCHS = ("sd1", "sd2")
COMPONENTS = ("unet", "te")
NETWORK_TYPES = ("LoRA", "LoCon")
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
KINDS = ("linear", "conv1x1", "conv3x3")

# A number without leading zeros, so "layers_01" is rejected instead of turning into "layers_1".
_N = r"(0|[1-9][0-9]*)"

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

# HF CLIP encoder-layer leaves (SD1, and kohya's spelling for SD2) → OpenCLIP resblock leaves (SD2).
# OpenCLIP packs q/k/v into one ``attn.in_proj_weight``: ``attn.q_proj`` etc. name its thirds, not
# modules (A1111 resolves them the same way, through the parent ``MultiheadAttention``).
_TE_LEAVES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TE_LEAVES_SD2_BACK = {v: k for k, v in _TE_LEAVES.items()}
_TE_LEAVES_BY_KOHYA = {k.replace(".", "_"): k for k in _TE_LEAVES}
PACKED_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")

_UNET_BLOCK_CLASSES = {"LoRA": ("SpatialTransformer",), "LoCon": ("SpatialTransformer", "ResBlock", "Downsample", "Upsample")}
_KINDS_FOR = {"LoRA": ("linear", "conv1x1"), "LoCon": KINDS}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")


def _upsampler_child(up: int) -> int:
    # Up-block 0 (the lowest level) has [ResBlock, Upsample]; the others [ResBlock, SpatialTransformer, Upsample].
    return 1 if up == 0 else 2


# ---- UNet -------------------------------------------------------------------------------------
def _attention_leaf(rest: str) -> str:
    if rest in ("proj_in", "proj_out"):
        return rest
    m = re.fullmatch(rf"transformer_blocks\.{_N}\.(.+)", rest)
    if m and m[2].replace(".", "_") in _BLOCK_LEAVES:
        return f"transformer_blocks_{m[1]}_{m[2].replace('.', '_')}"
    raise ValueError(f"{rest!r} is not a LoRA target inside a transformer block")


def _attention_leaf_back(rest: str) -> str:
    if rest in ("proj_in", "proj_out"):
        return rest
    m = re.fullmatch(rf"transformer_blocks_{_N}_(.+)", rest)
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


def _unet_to_kohya(path: str) -> str:
    m = re.fullmatch(rf"input_blocks\.{_N}\.{_N}\.(.+)", path)
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
    m = re.fullmatch(rf"output_blocks\.{_N}\.{_N}\.(.+)", path)
    if m:
        up, slot = divmod(int(m[1]), 3)
        if m[3] == "conv" and slot == 2 and int(m[2]) == _upsampler_child(up):
            return f"up_blocks_{up}_upsamplers_0_conv"
        return f"up_blocks_{up}_{_block_part(int(m[2]), slot, m[3])}"
    raise ValueError(f"UNet module {path!r} has no kohya name")


def _unet_from_kohya(name: str) -> str:
    m = re.fullmatch(rf"down_blocks_{_N}_downsamplers_0_conv", name)
    if m:
        return f"input_blocks.{3 + 3 * int(m[1])}.0.op"
    m = re.fullmatch(rf"up_blocks_{_N}_upsamplers_0_conv", name)
    if m:
        up = int(m[1])
        return f"output_blocks.{2 + 3 * up}.{_upsampler_child(up)}.conv"
    m = re.fullmatch(rf"down_blocks_{_N}_(resnets|attentions)_([01])_(.+)", name)
    if m:
        child, leaf = _block_path(m[2], m[4])
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[3])}.{child}.{leaf}"
    m = re.fullmatch(r"mid_block_(resnets_[01]|attentions_0)_(.+)", name)
    if m:
        block_type, slot = m[1].rsplit("_", 1)
        _, leaf = _block_path(block_type, m[2])
        return f"middle_block.{1 if block_type == 'attentions' else 2 * int(slot)}.{leaf}"
    m = re.fullmatch(rf"up_blocks_{_N}_(resnets|attentions)_([012])_(.+)", name)
    if m:
        child, leaf = _block_path(m[2], m[4])
        return f"output_blocks.{3 * int(m[1]) + int(m[3])}.{child}.{leaf}"
    raise ValueError(f"{UNET_PREFIX}{name} names no SD1/SD2 UNet module")


# ---- text encoder -----------------------------------------------------------------------------
def _te_to_kohya(path: str, arch: str) -> str:
    if arch == "sd1":
        m = re.fullmatch(rf"encoder\.layers\.{_N}\.(.+)", path)
        leaf = m[2] if m and m[2] in _TE_LEAVES else None
    else:
        m = re.fullmatch(rf"transformer\.resblocks\.{_N}\.(.+)", path)
        leaf = _TE_LEAVES_SD2_BACK.get(m[2]) if m else None
    if leaf is None:
        raise ValueError(f"{arch} text-encoder module {path!r} has no kohya name")
    return f"text_model_encoder_layers_{m[1]}_{leaf.replace('.', '_')}"


def _te_from_kohya(name: str, arch: str) -> str:
    m = re.fullmatch(rf"text_model_encoder_layers_{_N}_(.+)", name)
    if not m or m[2] not in _TE_LEAVES_BY_KOHYA:
        raise ValueError(f"{TE_PREFIX}{name} names no text-encoder module")
    leaf = _TE_LEAVES_BY_KOHYA[m[2]]
    if arch == "sd1":
        return f"encoder.layers.{m[1]}.{leaf}"
    return f"transformer.resblocks.{m[1]}.{_TE_LEAVES[leaf]}"


# ---- public -----------------------------------------------------------------------------------
def kohya_name(component: str, module_path: str, arch: str) -> str:
    """The kohya module name (no ``.lora_down.weight`` suffix) of ``module_path`` in ``component``.

    ``component`` "unet": path under ``diffusion_model``; "te": path under CLIP's text transformer (``models.ldm.clip_text_transformer``; SD1)
    or OpenCLIP's model (SD2). Raises ``ValueError`` for modules kohya does not name.
    """
    _check_arch(arch)
    if component == "unet":
        return UNET_PREFIX + _unet_to_kohya(module_path)
    if component == "te":
        return TE_PREFIX + _te_to_kohya(module_path, arch)
    raise ValueError(f"component {component!r} is not one of {', '.join(COMPONENTS)}")


def module_path_from_kohya(name: str, arch: str) -> tuple[str, str]:
    """Inverse of :func:`kohya_name`: ``(component, module_path)``; ``ValueError`` if unknown."""
    _check_arch(arch)
    if name.startswith(UNET_PREFIX):
        return "unet", _unet_from_kohya(name[len(UNET_PREFIX) :])
    if name.startswith(TE_PREFIX):
        return "te", _te_from_kohya(name[len(TE_PREFIX) :], arch)
    raise ValueError(f"{name!r} is not an SD1/SD2 kohya LoRA module name (lora_unet_… or lora_te_…)")


def module_kind(module: nn.Module) -> str | None:
    """The LoRA kind of a module: "linear", "conv1x1", "conv3x3" (kohya treats every non-1×1 conv
    alike), or None for modules LoRA does not wrap."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def dim_and_alpha(kind: str, network_dim: int, network_alpha: float, conv_dim: int, conv_alpha: float) -> tuple[int, float]:
    """Rank and alpha kohya gives a module of ``kind``: 3×3 convs get the conv pair, the rest the network pair."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return (conv_dim, conv_alpha) if kind == "conv3x3" else (network_dim, network_alpha)


def _unet_targets(unet: nn.Module, network_type: str) -> list[tuple[str, str]]:
    # Blocks are matched by class name, not class, so the copy of ldm inside A1111 matches as well.
    blocks, kinds = _UNET_BLOCK_CLASSES[network_type], _KINDS_FOR[network_type]
    out: dict[str, str] = {}
    for block_path, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_path, child in block.named_modules():
            kind = module_kind(child)
            if kind in kinds and child_path:
                out[f"{block_path}.{child_path}"] = kind
    return list(out.items())


def _te_targets(te: nn.Module, arch: str) -> list[tuple[str, str]]:
    # SD2's OpenCLIP keeps q, k and v in one packed in_proj_weight of nn.MultiheadAttention, not in
    # Linear modules, so peft cannot wrap them: SD2 trains attn.out_proj, mlp.c_fc and mlp.c_proj only.
    out = []
    for path, module in te.named_modules():
        if module_kind(module) != "linear":
            continue
        try:
            kohya_name("te", path, arch)
        except ValueError:
            continue
        out.append((path, "linear"))
    return out


def target_modules(unet: nn.Module | None, te: nn.Module | None, network_type: str, arch: str) -> dict[str, list[tuple[str, str]]]:
    """kohya's targets: ``{"unet": [(path, kind)…], "te": […]}`` (a ``None`` component gives ``[]``).

    LoRA: every Linear and 1×1 Conv2d inside the UNet's SpatialTransformers, and the text encoder's
    attention q/k/v/out and MLP fc1/fc2. LoCon adds every Linear and Conv2d of ResBlocks,
    Downsamples and Upsamples (3×3 convs train at conv dim/alpha, see :func:`dim_and_alpha`).
    """
    _check_arch(arch)
    if network_type not in NETWORK_TYPES:
        raise ValueError(f"network type {network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
    targets = {
        "unet": _unet_targets(unet, network_type) if unet is not None else [],
        "te": _te_targets(te, arch) if te is not None else [],
    }
    # A target kohya cannot name would be trained and then lost on export: refuse before training.
    for component, entries in targets.items():
        for path, _ in entries:
            try:
                kohya_name(component, path, arch)
            except ValueError as exc:
                raise UserError(f"this model's layout is not SD1/SD2's, so its LoRA could not be saved: {exc}") from None
    return targets

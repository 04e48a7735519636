"""LoRA on the attention of OpenCLIP text encoders (SD2's, SDXL's bigG), trained in weight space.

OpenCLIP's layers use ``nn.MultiheadAttention``, which reads its packed q/k/v weight
(``in_proj_weight``, the three stacked by rows) and ``out_proj.weight`` directly instead of calling
a module: a wrapper in the call path, as peft injects for Linears, would never run. kohya trains
these four projections as separate LoRAs (``self_attn_q_proj`` …, the names A1111 maps back onto
the packed weight), so for the length of each forward call the attention sees
``in_proj_weight + cat(up_q·down_q, up_k·down_k, up_v·down_v)·α/r`` and
``out_proj.weight + up_o·down_o·α/r``. That is the same function and the same gradients as a
LoRA around each projection; the one thing weight space cannot do is kohya's ``network_dropout``
(dropout on the down projection's output), which therefore does not reach these four.

The module itself is left as it is — same class, same parameters, no new children — because
A1111's Lora loader, which checks every epoch file during the run, accepts an attention only by
its exact class. Only an instance-level ``forward`` is added, and taken off afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit_ext.export.writer import ModuleWeights
from lorakit_ext.models.patching import patch_forwards

# The leaves kohya names for one MHA, in in_proj_weight's row order, then the output projection.
QKV = ("q_proj", "k_proj", "v_proj")


class LowRankDelta(nn.Module):
    """Adds ``cat(up_i · down_i) · scale`` to a weight of ``[sum(rows), cols]``."""

    def __init__(self, rows: list[int], cols: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.lora_down = nn.ParameterList([nn.Parameter(torch.empty(rank, cols)) for _ in rows])
        self.lora_up = nn.ParameterList([nn.Parameter(torch.zeros(n, rank)) for n in rows])
        for down in self.lora_down:
            # peft's and kohya's initialisation: Kaiming-uniform down, zero up (the delta starts at 0).
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.cat([up @ down for up, down in zip(self.lora_up, self.lora_down)]) * self.scale
        return weight + delta.to(weight.dtype)


@dataclass
class AttentionLora:
    """The LoRA of one ``nn.MultiheadAttention`` at ``path`` (relative to its component's root)."""

    path: str
    attention: nn.MultiheadAttention
    packed: LowRankDelta
    out: LowRankDelta
    alpha: float
    unpatch: object = None  # removes the forward patch

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The LoRA weights, named by the attention's path (stable across runs, for resuming)."""
        return [(f"{self.path}.{part}.{name}", p) for part, delta in (("qkv", self.packed), ("out", self.out))
                for name, p in delta.named_parameters()]

    def remove(self) -> None:
        self.unpatch()

    def pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """kohya's four modules of this attention: ``(leaf, down, up)``."""
        return [*zip(QKV, self.packed.lora_down, self.packed.lora_up), ("out_proj", self.out.lora_down[0], self.out.lora_up[0])]

    def module_weights(self, name_of) -> list[ModuleWeights]:
        """kohya's four modules; ``name_of(module_path)`` is the family's kohya name."""
        return [ModuleWeights(name_of(f"{self.path}.{leaf}"), _copy(down), _copy(up), self.alpha) for leaf, down, up in self.pairs()]


def _forward_with_deltas(lora: AttentionLora):
    attention = lora.attention
    # The class's forward as it is now: A1111's Lora extension replaces it for every attention.
    class_forward = type(attention).forward

    def forward(*args, **kwargs):
        # Swapped in the parameter tables, which attribute reads consult; assignment would refuse a
        # tensor that is not a Parameter.
        own, out = attention._parameters, attention.out_proj._parameters
        packed, projection = own["in_proj_weight"], out["weight"]
        own["in_proj_weight"], out["weight"] = lora.packed(packed), lora.out(projection)
        try:
            return class_forward(attention, *args, **kwargs)
        finally:
            own["in_proj_weight"], out["weight"] = packed, projection

    return forward


def _copy(weight: torch.Tensor) -> torch.Tensor:
    # A copy on the CPU: training may go on changing the parameter while the file is written.
    return weight.detach().to("cpu", torch.float32, copy=True)


def attach(root: nn.Module, path: str, rank: int, alpha: float) -> AttentionLora:
    """LoRA on the MHA at ``path``; its weights are fp32 on the MHA's device."""
    attention = root.get_submodule(path)
    if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
        raise ValueError(f"{path} is not a multi-head attention with a packed q/k/v weight")
    if "forward" in vars(attention):
        raise ValueError(f"{path} already has a patched forward; its LoRA would never run")
    embed = attention.embed_dim
    device = attention.in_proj_weight.device
    packed = LowRankDelta([embed] * 3, embed, rank, alpha / rank).to(device)
    out = LowRankDelta([embed], embed, rank, alpha / rank).to(device)
    lora = AttentionLora(path, attention, packed, out, alpha)
    lora.unpatch = patch_forwards([attention], lambda _: _forward_with_deltas(lora))
    return lora


def attention_paths(targets: list[tuple[str, str]]) -> list[str]:
    """The MHA paths of ``targets``' "attention" entries (one per four projections), in order."""
    return list(dict.fromkeys(path.rpartition(".")[0] for path, kind in targets if kind == "attention"))

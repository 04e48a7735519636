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

LoHa and LoKr train these projections as their own type too, so that a file holds one type
throughout: their delta is a weight anyway (a Hadamard or Kronecker product), added here to the
projection's rows just as the LoRA product is. A1111 applies each of the four modules to its third
of ``in_proj_weight`` (or to ``out_proj``) whatever its type.

The module itself is left as it is — same class, same parameters, no new children — because
A1111's Lora loader, which checks every epoch file during the run, accepts an attention only by
its exact class. Only an instance-level ``forward`` is added, and taken off afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft import inject_adapter_in_model
from torch import nn

from lorakit_ext.export.network_types import ADAPTER, LORA, NetworkType
from lorakit_ext.export.writer import ModuleTensors, ModuleWeights
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

    def projections(self) -> list[dict[str, nn.Parameter]]:
        """Each projection's weights by their name in a file."""
        return [{"lora_down.weight": down, "lora_up.weight": up} for down, up in zip(self.lora_down, self.lora_up)]


class PeftDelta(nn.Module):
    """Adds the deltas of LoHa or LoKr projections, stacked by rows, to a weight of ``[sum(rows), cols]``.

    Each projection is peft's layer of the type around a stand-in Linear of the projection's shape,
    so that peft creates and initialises its weights exactly as for the modules it wraps. The
    stand-in's weight is a zero-stride view of a single zero (no memory) and no parameter, so that
    neither the optimiser nor the resume state sees it; peft reads only its shape, device and dtype.
    """

    def __init__(self, network_type: NetworkType, rows: list[int], cols: int, rank: int, alpha: float, device: torch.device):
        super().__init__()
        self.network_type = network_type
        self.layers = nn.ModuleDict({f"rows{i}": _stand_in(n, cols, device) for i, n in enumerate(rows)})
        config = network_type.peft_config(list(self.layers), rank, alpha, {}, {}, 0.0)
        inject_adapter_in_model(config, self.layers, adapter_name=ADAPTER)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        deltas = [self.network_type.product(weights, layer.get_base_layer().weight.shape, layer.scaling[ADAPTER])
                  for layer, weights in zip(self.layers.values(), self.projections())]
        return weight + torch.cat(deltas).to(weight.dtype)

    def projections(self) -> list[dict[str, nn.Parameter]]:
        """Each projection's weights by their name in a file."""
        return [self.network_type.layer_tensors(layer, ADAPTER) for layer in self.layers.values()]


def _stand_in(rows: int, cols: int, device: torch.device) -> nn.Linear:
    linear = nn.Linear(cols, rows, bias=False, device="meta")
    del linear.weight
    linear.weight = torch.zeros((), device=device).expand(rows, cols)
    return linear


@dataclass
class AttentionLora:
    """The LoRA (or LoHa, LoKr) of one ``nn.MultiheadAttention`` at ``path`` (relative to its
    component's root)."""

    path: str
    attention: nn.MultiheadAttention
    network_type: NetworkType
    packed: LowRankDelta | PeftDelta  # q, k and v, stacked as in in_proj_weight
    out: LowRankDelta | PeftDelta
    rank: int
    alpha: float
    unpatch: object = None  # removes the forward patch

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The LoRA weights, named by the attention's path (stable across runs, for resuming)."""
        return [(f"{self.path}.{part}.{name}", p) for part, delta in (("qkv", self.packed), ("out", self.out))
                for name, p in delta.named_parameters()]

    def remove(self) -> None:
        self.unpatch()

    def projections(self) -> list[tuple[str, dict[str, nn.Parameter]]]:
        """kohya's four modules of this attention: ``(leaf, weights by their name in a file)``."""
        return [*zip(QKV, self.packed.projections()), ("out_proj", self.out.projections()[0])]

    def module_weights(self, name_of) -> list[ModuleWeights | ModuleTensors]:
        """kohya's four modules; ``name_of(module_path)`` is the family's kohya name."""
        return [self.network_type.record(name_of(f"{self.path}.{leaf}"), weights, self.alpha, self.rank)
                for leaf, weights in self.projections()]


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


def attach(root: nn.Module, path: str, network_type: NetworkType, rank: int, alpha: float) -> AttentionLora:
    """``network_type`` on the MHA at ``path``; its weights are fp32 on the MHA's device."""
    attention = root.get_submodule(path)
    if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
        raise ValueError(f"{path} is not a multi-head attention with a packed q/k/v weight")
    if "forward" in vars(attention):
        raise ValueError(f"{path} already has a patched forward; its LoRA would never run")
    embed = attention.embed_dim
    device = attention.in_proj_weight.device
    if network_type is LORA:
        # kohya's down/up layout, under the parameter names earlier runs saved their resume state with.
        packed = LowRankDelta([embed] * 3, embed, rank, alpha / rank).to(device)
        out = LowRankDelta([embed], embed, rank, alpha / rank).to(device)
    else:
        packed = PeftDelta(network_type, [embed] * 3, embed, rank, alpha, device)
        out = PeftDelta(network_type, [embed], embed, rank, alpha, device)
    lora = AttentionLora(path, attention, network_type, packed, out, rank, alpha)
    lora.unpatch = patch_forwards([attention], lambda _: _forward_with_deltas(lora))
    return lora


def attention_paths(targets: list[tuple[str, str]]) -> list[str]:
    """The MHA paths of ``targets``' "attention" entries (one per four projections), in order."""
    return list(dict.fromkeys(path.rpartition(".")[0] for path, kind in targets if kind == "attention"))

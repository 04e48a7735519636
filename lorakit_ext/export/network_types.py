"""Each network type in one place: its peft layer, the tensors a file holds for one of its modules,
and the weight delta those make, by the formulas of A1111's built-in Lora extension
(``network_lora.py``, ``network_hada.py``, ``network_lokr.py``).

Training (:mod:`lorakit_ext.train.network`), the export (:mod:`lorakit_ext.export.collect`) and the
merge for headless samples (:mod:`lorakit_ext.export.apply`) all ask the type object. LoHa's and
LoKr's peft attributes carry the very names A1111 reads (``hada_w1_a``, ``lokr_w1``, …), so a
module's tensors are the same dict in the model and in the file, up to LoKr's folded scale (below).

A1111 scales a module's product by ``alpha / dim`` where it knows ``dim`` (:meth:`NetworkType.dim`)
and by 1 where it does not: a LoKr module whose two Kronecker factors are both full matrices has no
rank in the file. Training scales every module by alpha / rank (current peft's rule), so for those
modules the export multiplies the scale into ``lokr_w1`` and writes ``alpha = rank``, as LyCORIS
records its full-matrix modules; a loader that does divide alpha by the rank reads 1 as well.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.loha.layer import make_weight as hadamard_weight
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import ModuleTensors, ModuleWeights

ALPHA = "alpha"
# The adapter name of the peft layers LoRA Kit injects.
ADAPTER = "lorakit"


def _matrix(t: torch.Tensor) -> torch.Tensor:
    # A1111's rebuild_conventional: a conv factor's trailing dimensions fold into its columns.
    return t.reshape(t.shape[0], -1)


def _copy(weight: torch.Tensor) -> torch.Tensor:
    # A copy on the CPU: training may go on changing the parameter while the file is written.
    return weight.detach().to("cpu", torch.float32, copy=True)


class NetworkType(ABC):
    """What one network type is; subclasses set the attributes and the formulas."""

    label: str  # how messages name it
    layer_class: type  # peft's layer class of this type
    # The tensors of one module, by their name in a file, in the order files list them.
    keys: tuple[str, ...]
    # A tensor the product is linear in: scaling it scales the module's delta.
    linear_in: str
    # Whether the delta factors through a rank-sized activation, so that training can apply the
    # factors to the input one after the other instead of building the weight-sized delta.
    factored: bool = False

    @abstractmethod
    def peft_config(self, names: list[str], rank: int, alpha: float, rank_pattern: dict, alpha_pattern: dict, dropout: float):
        """peft's config that injects this type into the modules ``names`` (full paths), ``rank_pattern``
        and ``alpha_pattern`` overriding rank and alpha per path; :class:`UserError` for what it cannot train."""

    def layer_tensors(self, layer: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        """The weights of a peft layer of this type, by their name in a file."""
        return {key: getattr(layer, key)[adapter] for key in self.keys if adapter in getattr(layer, key)}

    def adapters(self, layer: nn.Module) -> list[str]:
        """The adapters that hold weights in a peft layer of this type."""
        return sorted({adapter for key in self.keys for adapter in getattr(layer, key)})

    def claims(self, keys: set[str]) -> bool:
        """Whether a file module with tensors ``keys`` (besides alpha) is of this type, as A1111 decides it."""
        return keys == set(self.keys)

    @abstractmethod
    def dim(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """A1111's ``dim`` of a module: alpha scales its product by ``alpha / dim``; None: not at all."""

    @abstractmethod
    def product(self, tensors: dict[str, torch.Tensor], shape: torch.Size, scale: float) -> torch.Tensor:
        """The module's weight delta, ``scale`` times its product, shaped as the weight; ValueError if it does not fit."""

    # ---- files ---------------------------------------------------------------------------------
    def file_tensors(self, weights: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
        """What a file holds for a module trained with ``weights`` at ``alpha / rank``: fp32 CPU copies
        and a 0-d alpha, the scale folded in where A1111 would not apply it."""
        out = {key: _copy(weights[key]) for key in self.keys if key in weights}
        if self.dim(out) is None:
            out[self.linear_in] *= alpha / rank
            alpha = rank
        out[ALPHA] = torch.tensor(float(alpha))
        return out

    def record(self, kohya_name: str, weights: dict[str, torch.Tensor], alpha: float, rank: int) -> ModuleTensors | ModuleWeights:
        """The module of a file, for a module trained with ``weights`` at ``alpha / rank``."""
        return ModuleTensors(kohya_name, self.file_tensors(weights, alpha, rank))

    def trained_tensors(self, file: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`file_tensors`: the weights that make a file module's delta at ``alpha / rank``."""
        out = {key: file[key].float() for key in self.keys if key in file}
        # With alpha 0 the delta is 0 whatever the weights; the file's (zero) weight is as good as any.
        if self.dim(out) is None and alpha:
            out[self.linear_in] = out[self.linear_in] / (alpha / rank)
        return out


def _fit(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if delta.numel() != shape.numel():
        raise ValueError(f"the product has {tuple(delta.shape)}, {delta.numel()} values")
    return delta.reshape(shape)


class Lora(NetworkType):
    """kohya's LoRA (and LoCon, the same with 3×3 convs): ``up · down``, kohya's ``lora_down``/``lora_up``
    being peft's ``lora_A``/``lora_B``."""

    label = "LoRA"
    layer_class = LoraLayer
    keys = ("lora_down.weight", "lora_up.weight")
    linear_in = "lora_up.weight"
    factored = True

    def peft_config(self, names, rank, alpha, rank_pattern, alpha_pattern, dropout):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, init_lora_weights=True, bias="none")

    def layer_tensors(self, layer, adapter):
        return {"lora_down.weight": layer.lora_A[adapter].weight, "lora_up.weight": layer.lora_B[adapter].weight}

    def adapters(self, layer):
        return list(layer.lora_A.keys())

    def record(self, kohya_name, weights, alpha, rank):
        # kohya's record (down, up, alpha), which the callers of a LoRA's export read.
        tensors = self.file_tensors(weights, alpha, rank)
        return ModuleWeights(kohya_name, tensors["lora_down.weight"], tensors["lora_up.weight"], alpha)

    def dim(self, tensors):
        return tensors["lora_down.weight"].shape[0]

    def product(self, tensors, shape, scale):
        down, up = _matrix(tensors["lora_down.weight"]), _matrix(tensors["lora_up.weight"])
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"up rank {up.shape[1]} ≠ down rank {down.shape[0]}")
        return _fit(up @ down * scale, shape)


class _Lycoris(NetworkType):
    """LyCORIS's algorithms, through peft's layers of them (without Tucker convs: plain matrices)."""

    config_class: type
    config_options: dict

    def peft_config(self, names, rank, alpha, rank_pattern, alpha_pattern, dropout):
        if dropout:
            raise UserError(f"network_dropout acts on a LoRA's rank-sized down output, which {self.label} does not have "
                            "(LyCORIS ignores it for LoHa and LoKr too); set it to 0")
        return self.config_class(r=rank, alpha=alpha, target_modules=names, rank_pattern=rank_pattern,
                                 alpha_pattern=alpha_pattern, init_weights=True, use_effective_conv2d=False, **self.config_options)


class Loha(_Lycoris):
    """LoHa: the Hadamard product ``(w1_a · w1_b) ⊙ (w2_a · w2_b)``."""

    label = "LoHa"
    layer_class = LoHaLayer
    config_class = LoHaConfig
    config_options = {}
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    linear_in = "hada_w1_a"

    def dim(self, tensors):
        return tensors["hada_w1_b"].shape[0]

    def product(self, tensors, shape, scale):
        w1a, w1b, w2a, w2b = (_matrix(tensors[key]) for key in self.keys)
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
            raise ValueError("the factors' ranks differ")
        if (w1a.shape[0], w1b.shape[1]) != (w2a.shape[0], w2b.shape[1]):
            raise ValueError("the two products differ in shape")
        # peft's autograd function: backward recomputes the two weight-sized products instead of
        # keeping them, which would hold two copies of every trained weight until the step ends.
        scale = torch.tensor(scale, dtype=torch.float32)
        return _fit(hadamard_weight(w1a, w1b, w2a, w2b, scale), shape)


class Lokr(_Lycoris):
    """LoKr: the Kronecker product ``w1 ⊗ w2``, each factor a full matrix or ``a · b`` of rank r.

    peft decides which (a factor is full where the rank is at least half its larger side) and keeps
    ``w1`` full, as LyCORIS's default ``decompose_both = False``; ``factor = -1`` splits each side into
    its two most balanced factors, A1111's and LyCORIS's default."""

    label = "LoKr"
    layer_class = LoKrLayer
    config_class = LoKrConfig
    config_options = {"decompose_both": False, "decompose_factor": -1}
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    linear_in = "lokr_w1"

    def claims(self, keys):
        one = {"lokr_w1"} if "lokr_w1" in keys else {"lokr_w1_a", "lokr_w1_b"}
        two = {"lokr_w2"} if "lokr_w2" in keys else {"lokr_w2_a", "lokr_w2_b"}
        return keys == one | two

    def dim(self, tensors):
        # network_lokr.py: the rank of w2's factors wins over w1's; two full matrices have none.
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in tensors:
                return tensors[key].shape[0]
        return None

    @staticmethod
    def _factor(tensors, name) -> torch.Tensor:
        if name in tensors:
            return tensors[name]
        a, b = tensors[f"{name}_a"], tensors[f"{name}_b"]
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"{name}'s factors' ranks differ")
        return a @ b

    def product(self, tensors, shape, scale):
        w1, w2 = self._factor(tensors, "lokr_w1") * scale, self._factor(tensors, "lokr_w2")
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return _fit(torch.kron(w1, w2.contiguous()), shape)


LORA, LOHA, LOKR = Lora(), Loha(), Lokr()
# TrainConfig.network_type → its type; LoCon is LoRA with the 3×3 convs among its targets.
BY_NETWORK_TYPE = {"LoRA": LORA, "LoCon": LORA, "LoHa": LOHA, "LoKr": LOKR}
TYPES = (LORA, LOHA, LOKR)


def type_of_layer(module: nn.Module) -> NetworkType | None:
    """The type of a peft layer, or None for any other module."""
    return next((t for t in TYPES if isinstance(module, t.layer_class)), None)


def type_of_keys(keys: set[str]) -> NetworkType | None:
    """The type of a file module with tensors ``keys`` (alpha left out), or None if A1111 knows none."""
    return next((t for t in TYPES if t.claims(keys)), None)

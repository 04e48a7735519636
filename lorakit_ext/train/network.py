"""LoRA / LoCon / LoHa / LoKr injection into the user's model with peft, and its exact removal.

What differs between the types is asked of their type object (:mod:`lorakit_ext.export.network_types`).
OpenCLIP's attention projections, which no wrapper can reach, train in weight space instead
(:mod:`lorakit_ext.train.attention_lora`).

The model is the user's (A1111's ``shared.sd_model``): after training — success, interrupt or
exception — every injected wrapper is replaced by the original module object and each parameter's
``requires_grad``, each module's train/eval mode and every weight are as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.collect import collect_peft_weights
from lorakit_ext.export.network_types import ADAPTER, ALPHA, BY_NETWORK_TYPE, NetworkType, type_of_keys
from lorakit_ext.export.writer import ModuleTensors, ModuleWeights, read_lora_file
from lorakit_ext.models.families.base import ATTENTION
from lorakit_ext.models.patching import patch_forwards
from lorakit_ext.train import attention_lora
from lorakit_ext.train.half_weights import HalfWeights

# Where a LoRA layer finds its (down, up) half copies while HalfWeights are in use.
HALF_WEIGHTS = "lorakit_half_weights"


@dataclass
class ModelState:
    """What training may change on a module tree besides the weights, to put back afterwards."""

    requires_grad: dict[nn.Parameter, bool]
    training: dict[nn.Module, bool]
    # peft leaves a `peft_config` attribute on every module tree it injects into.
    without_peft_config: list[nn.Module]

    @classmethod
    def capture(cls, root: nn.Module) -> "ModelState":
        return cls(
            {p: p.requires_grad for p in root.parameters()},
            {m: m.training for m in root.modules()},
            [m for m in root.modules() if not hasattr(m, "peft_config")],
        )

    def restore(self) -> None:
        for param, flag in self.requires_grad.items():
            param.requires_grad_(flag)
        for module, flag in self.training.items():
            module.training = flag
        for module in self.without_peft_config:
            if "peft_config" in vars(module):
                del module.peft_config


@dataclass
class Component:
    name: str  # "unet" or one of the model's text encoders ("te")
    root: nn.Module
    alphas: dict[str, float] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)
    attentions: list[attention_lora.AttentionLora] = field(default_factory=list)


def _config(network_type: NetworkType, targets, c):
    """peft's config of ``network_type`` for ``targets`` and each target's alpha, from TrainConfig ``c``."""
    names = [path for path, _ in targets]
    convs = [path for path, kind in targets if kind == "conv3x3"]
    alphas = {path: (c.conv_alpha if kind == "conv3x3" else c.network_alpha) for path, kind in targets}
    # Full module paths as pattern keys: peft's older versions fall back to an exact-key lookup (or,
    # for LoHa/LoKr, a pattern anchored at the end), newer ones match a full path against itself, so
    # the same dict works on both.
    config = network_type.peft_config(names, c.network_dim, c.network_alpha, {p: c.conv_dim for p in convs},
                                      {p: c.conv_alpha for p in convs}, c.network_dropout)
    return config, alphas


def _lora_forward(layer: BaseTunerLayer):
    """The forward pass of one injected layer: ``base(x) + up(dropout(down(x)) · alpha / dim)``.

    peft's own forward casts every LoRA input to the LoRA weights' dtype (fp32 here). Under autocast
    that is an fp32 copy and a half copy of each input, and the half copy is kept for backward:
    an activation-sized tensor per module that kohya's network does not keep, and four extra
    kernels per module. Here the input stays as it is, and the weights are the half copies of
    :class:`~lorakit_ext.train.half_weights.HalfWeights` in a training forward (else autocast
    casts the small fp32 weights). Dropout acts on the rank-sized down output, as kohya's
    ``network_dropout`` does.

    The scale multiplies that rank-sized output rather than the layer-sized one (the same product:
    ``up`` is linear), and for a Linear the up projection adds itself into the base output inside
    its GEMM (``addmm_``): no layer-sized multiply or add, forward or backward, in a module that
    runs ~200 times per SD1.5 step.
    """
    base = layer.get_base_layer()
    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    dropout, scale = layer.lora_dropout[ADAPTER], layer.scaling[ADAPTER]

    def weights():
        half = getattr(layer, HALF_WEIGHTS, None)
        return half if half is not None and torch.is_grad_enabled() else (down.weight, up.weight)

    if not isinstance(base, nn.Linear):
        def conv_forward(x, *args, **kwargs):
            w_down, w_up = weights()
            low = dropout(down._conv_forward(x, w_down, None)) * scale
            return base(x, *args, **kwargs) + up._conv_forward(low, w_up, None)

        return conv_forward

    def forward(x, *args, **kwargs):
        w_down, w_up = weights()
        # On rows, so that the base output is a fresh 2-D tensor: an in-place op on a view of it
        # would make autograd copy the whole gradient back in backward.
        rows = x.reshape(-1, x.shape[-1])
        out = base(rows, *args, **kwargs)
        low = dropout(F.linear(rows, w_down)) * scale
        out.addmm_(low.to(out.dtype), w_up.to(out.dtype).t())
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


def _weight_delta_forward(network_type: NetworkType):
    """The forward pass of a LoHa or LoKr layer: ``base(x) + op(x, delta)``, ``op`` the base layer's
    linear or conv operation and ``delta`` its type's product (the formula its files are merged by).

    peft's own forward would do the same through its ``get_delta_weight``; that one leaves LoKr
    unscaled in peft 0.13 (A1111's pin) and scales it by alpha / rank in later versions, so the
    delta is computed here, the same on every peft version. It also leaves out peft's per-call
    ``torch.rand`` (module dropout, which LoRA Kit does not offer).
    """

    def make(layer: BaseTunerLayer):
        base = layer.get_base_layer()
        weights, shape, scale = network_type.layer_tensors(layer, ADAPTER), base.weight.shape, layer.scaling[ADAPTER]
        op = (functools.partial(F.conv2d, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
              if isinstance(base, nn.Conv2d) else F.linear)

        def forward(x, *args, **kwargs):
            return base(x, *args, **kwargs) + op(x, network_type.product(weights, shape, scale))

        return forward

    return make


def _remove_peft_layers(root: nn.Module) -> None:
    for name, module in list(root.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, module.get_base_layer())


class LoraNetwork:
    """The LoRA (or LoCon, LoHa, LoKr) modules of one training run, injected into ``model`` (a DiffusionModel)."""

    def __init__(self, model, config, seed: int):
        self.model = model
        self.config = config
        self.network_type = BY_NETWORK_TYPE[config.network_type]
        self.seed = seed
        self.components: list[Component] = []
        self._state: ModelState | None = None

    @property
    def train_text_encoder(self) -> bool:
        return self.config.text_encoder_lr > 0

    def inject(self) -> None:
        c, network_type = self.config, self.network_type
        roots = {"unet": self.model.unet, **(self.model.text_encoders if self.train_text_encoder else {})}
        targets = self.model.family.target_modules(roots, c.network_type)
        self._state = ModelState.capture(self.model.sd_model)
        for p in self.model.sd_model.parameters():
            p.requires_grad_(False)
        # peft draws the down weights from torch's global RNG: seed it for reproducible runs without
        # disturbing the RNG stream of the host application.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, entries in targets.items():
                if not entries:
                    continue
                root = roots[name]
                wrapped = [(path, kind) for path, kind in entries if kind != ATTENTION]
                alphas = {}
                if wrapped:
                    peft_config, alphas = _config(network_type, wrapped, c)
                    inject_adapter_in_model(peft_config, root, adapter_name=ADAPTER)
                    # No undo needed: the layers themselves go away in remove().
                    forward = _lora_forward if network_type.factored else _weight_delta_forward(network_type)
                    patch_forwards([m for m in root.modules() if isinstance(m, BaseTunerLayer)], forward)
                component = Component(name, root, alphas)
                self.components.append(component)
                for path in attention_lora.attention_paths(entries):
                    component.attentions.append(attention_lora.attach(root, path, network_type, c.network_dim, c.network_alpha))
                for _, param in _named_network_parameters(component):
                    # The network's weights train in fp32 whatever the base model's dtype.
                    param.data = param.data.float()
                    param.requires_grad_(True)
                    component.params.append(param)
        for comp in self.components:
            comp.root.train()

    def use_half_weights(self, dtype: torch.dtype) -> HalfWeights | None:
        """Half copies of the LoRA and LoCon layers' weights for training forwards under an
        autocast to ``dtype``; None for network types that keep their own forward."""
        layers = [m for comp in self.components for m in comp.root.modules() if isinstance(m, BaseTunerLayer)]
        if not self.network_type.factored or not layers:
            return None
        pairs = [(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight) for layer in layers]
        half = HalfWeights([p for pair in pairs for p in pair], dtype)
        for layer, (down, up) in zip(layers, pairs):
            # A plain attribute (not a registered tensor): the layer's state_dict stays peft's.
            object.__setattr__(layer, HALF_WEIGHTS, (half.of[down], half.of[up]))
        return half

    def remove(self) -> None:
        for comp in self.components:
            for attention in comp.attentions:
                attention.remove()
            _remove_peft_layers(comp.root)
        if self._state is not None:
            self._state.restore()
        self.components.clear()
        self._state = None

    # ---- optimiser groups, resume state, export ---------------------------------------------
    def param_groups(self) -> list[dict]:
        # Every text encoder trains at text_encoder_lr, as in kohya (SDXL's two as well).
        c = self.config
        return [
            {"params": comp.params, "lr": c.unet_lr if comp.name == "unet" else c.text_encoder_lr, "name": comp.name}
            for comp in self.components
            if comp.params
        ]

    def parameters(self) -> list[nn.Parameter]:
        return [p for comp in self.components for p in comp.params]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{comp.name}.{n}": p.detach().clone() for comp in self.components for n, p in _named_network_parameters(comp)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {f"{comp.name}.{n}": p for comp in self.components for n, p in _named_network_parameters(comp)}
        missing = set(mine) - set(state)
        if missing:
            raise ValueError(f"resume state lacks {len(missing)} {self.network_type.label} weights, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for key, param in mine.items():
                param.copy_(state[key])

    def _modules(self) -> dict[str, tuple[dict[str, nn.Parameter], float, int]]:
        """Every module by its kohya name: ``(weights by their name in a file, alpha, rank)``."""
        family, out = self.model.family, {}
        for comp in self.components:
            for path, layer in comp.root.named_modules():
                if isinstance(layer, BaseTunerLayer):
                    out[family.kohya_name(comp.name, path)] = (self.network_type.layer_tensors(layer, ADAPTER), comp.alphas[path], layer.r[ADAPTER])
            for attention in comp.attentions:
                for leaf, weights in attention.projections():
                    out[family.kohya_name(comp.name, f"{attention.path}.{leaf}")] = (weights, attention.alpha, attention.rank)
        return out

    def load_weights(self, path: Path) -> None:
        """Starts from a LoRA file (kohya's ``network_weights``): it must have exactly this run's
        modules, type, ranks and alphas, or :class:`UserError` says which one differs."""
        tensors, _ = read_lora_file(path)
        files: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in tensors.items():
            name, _, part = key.partition(".")
            files[name][part] = tensor
        mine = self._modules()
        problems = []
        if set(files) != set(mine):
            extra, missing = sorted(set(files) - set(mine)), sorted(set(mine) - set(files))
            problems.append(f"{len(missing)} of this run's modules are not in it (e.g. {missing[:1]}) and {len(extra)} "
                            f"of its modules are not in this run (e.g. {extra[:1]}): a different network type, model family "
                            "or text-encoder setting")
        for name in sorted(set(files) & set(mine)):
            weights, alpha, rank = mine[name]
            problem = _misfit(self.network_type, name, files[name], self.network_type.file_tensors(weights, alpha, rank), rank)
            if problem:
                problems.append(problem)
            if len(problems) >= 3:
                break
        if problems:
            raise UserError(f"network_weights {Path(path).name} does not fit this run: " + "; ".join(problems)
                            + ". Use the same network type, dim, alpha (and conv dim/alpha) as the run that wrote it")
        with torch.no_grad():
            for name, (weights, alpha, rank) in mine.items():
                for key, value in self.network_type.trained_tensors(files[name], alpha, rank).items():
                    weights[key].copy_(value)

    def export(self) -> list[ModuleWeights | ModuleTensors]:
        out = []
        for comp in self.components:
            out += collect_peft_weights(comp.root, comp.name, self.model.family, comp.alphas.__getitem__)
            for attention in comp.attentions:
                out += attention.module_weights(lambda path, comp=comp: self.model.family.kohya_name(comp.name, path))
        return out


def _misfit(network_type: NetworkType, name: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], rank: int) -> str | None:
    """Why a file's module ``theirs`` cannot start this run's module of ``rank`` (which would write
    ``ours``), or None."""
    their_type = type_of_keys(set(theirs) - {ALPHA})
    if their_type is not network_type:
        return f"{name} is {f'a {their_type.label}' if their_type else 'no known'} module where this run trains {network_type.label}"
    if {k: tuple(t.shape) for k, t in theirs.items() if k != ALPHA} != {k: tuple(t.shape) for k, t in ours.items() if k != ALPHA}:
        dim = network_type.dim(theirs)
        return f"{name} has rank {'?' if dim is None else dim} where this run has {rank}"
    alpha = float(ours[ALPHA])
    if ALPHA in theirs and abs(float(theirs[ALPHA]) - alpha) > 1e-3 * max(1.0, alpha):
        return f"{name} has alpha {float(theirs[ALPHA]):g} where this run has {alpha:g}"
    return None


def _named_network_parameters(comp: Component) -> list[tuple[str, nn.Parameter]]:
    """The injected layers' weights under the component's root (peft names them after the adapter),
    then the attention ones beside it."""
    own = [(n, p) for n, p in comp.root.named_parameters() if ADAPTER in n.split(".")]
    return own + [pair for attention in comp.attentions for pair in attention.named_parameters()]


@contextlib.contextmanager
def injected(model, config, seed: int):
    network = LoraNetwork(model, config, seed)
    try:
        network.inject()
        yield network
    finally:
        network.remove()

"""LoRA / LoCon injection into the user's model with peft, and its exact removal.

OpenCLIP's attention projections, which no wrapper can reach, train in weight space instead
(:mod:`lorakit_ext.train.attention_lora`).

The model is the user's (A1111's ``shared.sd_model``): after training — success, interrupt or
exception — every injected wrapper is replaced by the original module object and each parameter's
``requires_grad``, each module's train/eval mode and every weight are as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.collect import collect_peft_weights
from lorakit_ext.export.writer import ModuleWeights, read_lora_file
from lorakit_ext.models.families.base import ATTENTION
from lorakit_ext.models.patching import patch_forwards
from lorakit_ext.train import attention_lora

ADAPTER = "lorakit"


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


def _config(targets, dim, alpha, conv_dim, conv_alpha, dropout) -> tuple[LoraConfig, dict[str, float]]:
    names = [path for path, _ in targets]
    convs = [path for path, kind in targets if kind == "conv3x3"]
    alphas = {path: (conv_alpha if kind == "conv3x3" else alpha) for path, kind in targets}
    # Full module paths as pattern keys: peft's older versions fall back to an exact-key lookup,
    # newer ones match a full path against itself, so the same dict works on both.
    config = LoraConfig(
        r=dim,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        rank_pattern={p: conv_dim for p in convs},
        alpha_pattern={p: conv_alpha for p in convs},
        init_lora_weights=True,
        bias="none",
    )
    return config, alphas


def _lora_forward(layer: LoraLayer):
    """The forward pass of one injected layer: ``base(x) + up(dropout(down(x))) * alpha / dim``.

    peft's own forward casts every LoRA input to the LoRA weights' dtype (fp32 here). Under autocast
    that is an fp32 copy and a half copy of each input, and the half copy is kept for backward:
    an activation-sized tensor per module that kohya's network does not keep, and four extra
    kernels per module. Here the input stays as it is and autocast casts the small LoRA weights.
    Dropout acts on the rank-sized down output, as kohya's ``network_dropout`` does.
    """
    base = layer.get_base_layer()
    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    dropout, scale = layer.lora_dropout[ADAPTER], layer.scaling[ADAPTER]

    def forward(x, *args, **kwargs):
        return base(x, *args, **kwargs) + up(dropout(down(x))) * scale

    return forward


def _remove_lora_layers(root: nn.Module) -> None:
    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, module.get_base_layer())


class LoraNetwork:
    """The LoRA modules of one training run, injected into ``model`` (a DiffusionModel)."""

    def __init__(self, model, config, seed: int):
        self.model = model
        self.config = config
        self.seed = seed
        self.components: list[Component] = []
        self._state: ModelState | None = None

    @property
    def train_text_encoder(self) -> bool:
        return self.config.text_encoder_lr > 0

    def inject(self) -> None:
        c = self.config
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
                    peft_config, alphas = _config(wrapped, c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha, c.network_dropout)
                    inject_adapter_in_model(peft_config, root, adapter_name=ADAPTER)
                    # No undo needed: the layers themselves go away in remove().
                    patch_forwards([m for m in root.modules() if isinstance(m, LoraLayer)], _lora_forward)
                component = Component(name, root, alphas)
                self.components.append(component)
                for path in attention_lora.attention_paths(entries):
                    component.attentions.append(attention_lora.attach(root, path, c.network_dim, c.network_alpha))
                for _, param in _named_lora_parameters(component):
                    # LoRA weights train in fp32 whatever the base model's dtype.
                    param.data = param.data.float()
                    param.requires_grad_(True)
                    component.params.append(param)
        for comp in self.components:
            comp.root.train()

    def remove(self) -> None:
        for comp in self.components:
            for attention in comp.attentions:
                attention.remove()
            _remove_lora_layers(comp.root)
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
        return {f"{comp.name}.{n}": p.detach().clone() for comp in self.components for n, p in _named_lora_parameters(comp)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {f"{comp.name}.{n}": p for comp in self.components for n, p in _named_lora_parameters(comp)}
        missing = set(mine) - set(state)
        if missing:
            raise ValueError(f"resume state lacks {len(missing)} LoRA weights, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for key, param in mine.items():
                param.copy_(state[key])

    def _modules(self) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
        """Every LoRA module by its kohya name: ``(down, up, alpha)``."""
        family, out = self.model.family, {}
        for comp in self.components:
            for path, layer in comp.root.named_modules():
                if isinstance(layer, LoraLayer) and layer.lora_A:
                    out[family.kohya_name(comp.name, path)] = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, comp.alphas[path])
            for attention in comp.attentions:
                for leaf, down, up in attention.pairs():
                    out[family.kohya_name(comp.name, f"{attention.path}.{leaf}")] = (down, up, attention.alpha)
        return out

    def load_weights(self, path: Path) -> None:
        """Starts from a kohya-format LoRA (kohya's ``network_weights``): it must have exactly this
        run's modules, ranks and alphas, or :class:`UserError` says which one differs."""
        tensors, _ = read_lora_file(path)
        mine = self._modules()
        names = {key.partition(".")[0] for key in tensors}
        problems = []
        if names != set(mine):
            extra, missing = sorted(names - set(mine)), sorted(set(mine) - names)
            problems.append(f"{len(missing)} of this run's modules are not in it (e.g. {missing[:1]}) and {len(extra)} "
                            f"of its modules are not in this run (e.g. {extra[:1]}): a different network type, model family "
                            "or text-encoder setting")
        for name in sorted(names & set(mine)):
            down, up, alpha = mine[name]
            theirs = (tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight"))
            if any(t is None for t in theirs) or tuple(theirs[0].shape) != tuple(down.shape) or tuple(theirs[1].shape) != tuple(up.shape):
                problems.append(f"{name} has rank {theirs[0].shape[0] if theirs[0] is not None else '?'} where this run has {down.shape[0]}")
            elif f"{name}.alpha" in tensors and abs(float(tensors[f"{name}.alpha"]) - alpha) > 1e-3 * max(1.0, alpha):
                problems.append(f"{name} has alpha {float(tensors[f'{name}.alpha']):g} where this run has {alpha:g}")
            if len(problems) >= 3:
                break
        if problems:
            raise UserError(f"network_weights {Path(path).name} does not fit this run: " + "; ".join(problems)
                            + ". Use the same network type, dim, alpha (and conv dim/alpha) as the run that wrote it")
        with torch.no_grad():
            for name, (down, up, _) in mine.items():
                down.copy_(tensors[f"{name}.lora_down.weight"])
                up.copy_(tensors[f"{name}.lora_up.weight"])

    def export(self) -> list[ModuleWeights]:
        out = []
        for comp in self.components:
            out += collect_peft_weights(comp.root, comp.name, self.model.family, comp.alphas.__getitem__)
            for attention in comp.attentions:
                out += attention.module_weights(lambda path, comp=comp: self.model.family.kohya_name(comp.name, path))
        return out


def _named_lora_parameters(comp: Component) -> list[tuple[str, nn.Parameter]]:
    """peft's LoRA weights under the component's root, then the attention LoRAs' beside it."""
    own = [(n, p) for n, p in comp.root.named_parameters() if "lora_" in n]
    return own + [pair for attention in comp.attentions for pair in attention.named_parameters()]


@contextlib.contextmanager
def injected(model, config, seed: int):
    network = LoraNetwork(model, config, seed)
    try:
        network.inject()
        yield network
    finally:
        network.remove()

"""Optimiser and learning-rate schedule for a run, from ``TrainConfig``.

Every optimiser either runs as asked or is refused before training with the command that installs
it. The one substitution, AdamW8bit → torch AdamW (the same update with 32-bit state), is said to
the user and recorded as what ran (``ss_optimizer``). It happens without bitsandbytes, and where
the step would be captured in a CUDA graph: bitsandbytes' 8-bit step passes its step count and rate
to its kernels as host numbers, which a replayed graph would keep at their captured values, so
AdamW8bit would leave every step eager, while for a LoRA the 8-bit state saves only megabytes.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
from transformers import get_scheduler
from transformers.optimization import (
    Adafactor,
    AdafactorSchedule,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from lorakit_ext.errors import UserError
from lorakit_ext.optimizer_options import PACKAGES, optimizer_kwargs, relative_step
from lorakit_ext.train.graphs import settings_keep_eager

INSTALL_ENV = "LORAKIT_INSTALL_OPTIMIZERS"


@dataclass(frozen=True)
class OptimizerChoice:
    name: str  # what runs
    cls: type
    note: str | None = None  # a substitution, in words, for the user


def install_hint(package: str) -> str:
    return (f"`{sys.executable} -m pip install {package}` (inside A1111: start it once with {INSTALL_ENV}=1 and "
            "LoRA Kit's install.py adds it)")


def _optional_class(name: str):
    module, cls, package = PACKAGES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except Exception as exc:  # bitsandbytes raises RuntimeError/OSError on machines without CUDA
        raise ModuleNotFoundError(f"{name} needs the '{package}' package ({type(exc).__name__}: {exc})") from None


# What torch's AdamW takes besides the parameters: AdamW8bit arguments beyond these keep bitsandbytes.
_TORCH_ADAMW_ARGS = {"lr", "betas", "eps", "weight_decay", "amsgrad"}


def _captured_note(extra_mib: float) -> str:
    return (f"AdamW8bit: training with torch's fused AdamW (32-bit state, {extra_mib:.0f} MiB more for this LoRA) so that "
            "each step replays as a CUDA graph, several times faster; bitsandbytes' 8-bit step cannot be replayed. "
            "For bitsandbytes' AdamW8bit, set cuda_graphs off (eager steps).")


def choose_optimizer(name: str, *, captured: bool = False, kwargs: dict | None = None, parameters: int = 0) -> OptimizerChoice:
    """The optimiser class for ``name``; :class:`UserError` with the install command when missing.
    ``captured``: the steps would replay as CUDA graphs (AdamW8bit then trains as torch AdamW,
    unless ``kwargs`` holds arguments only bitsandbytes takes); ``parameters``: how many the
    optimiser will hold, for the note."""
    if name == "AdamW":
        return OptimizerChoice(name, torch.optim.AdamW)
    if name == "AdamW8bit" and captured and set(kwargs or {}) <= _TORCH_ADAMW_ARGS:
        # Two fp32 moments against two 8-bit ones (bitsandbytes' block scales aside).
        return OptimizerChoice("AdamW", torch.optim.AdamW, _captured_note(parameters * 6 / 2**20))
    if name == "Adafactor":
        return OptimizerChoice(name, Adafactor)
    try:
        return OptimizerChoice(name, _optional_class(name))
    except ModuleNotFoundError as exc:
        if name == "AdamW8bit":
            note = (f"{exc}; training with torch AdamW instead (the same update with 32-bit state). "
                    f"To train with AdamW8bit: {install_hint(PACKAGES[name][2])}")
            return OptimizerChoice("AdamW", torch.optim.AdamW, note)
        raise UserError(f"optimizer {name} is not available: {exc}; install it with {install_hint(PACKAGES[name][2])}, "
                        "or choose AdamW") from None


def _choice_for(config, device: torch.device, parameters: int = 0) -> tuple[OptimizerChoice, dict]:
    """The optimiser a run of ``config`` on ``device`` trains with, and its keyword arguments."""
    kwargs = optimizer_kwargs(config)
    captured = settings_keep_eager(config, device) is None
    return choose_optimizer(config.optimizer, captured=captured, kwargs=kwargs, parameters=parameters), kwargs


def _construct(choice: OptimizerChoice, groups: list[dict], kwargs: dict) -> torch.optim.Optimizer:
    try:
        return choice.cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{choice.name} refuses these arguments ({exc}); check optimizer_args") from None


def build_optimizer(config, groups: list[dict], device: torch.device) -> tuple[torch.optim.Optimizer, OptimizerChoice]:
    """The optimiser over ``groups`` and the choice that made it; bad ``optimizer_args`` are a
    :class:`UserError` naming the optimiser."""
    choice, kwargs = _choice_for(config, device, sum(p.numel() for group in groups for p in group["params"]))
    if choice.cls is torch.optim.AdamW and "fused" not in kwargs and device.type == "cuda":
        # Fused and capturable on CUDA: one kernel for all LoRA weights, and no host sync, so the
        # step can live in a CUDA graph.
        kwargs.update(fused=True, capturable=True)
    return _construct(choice, groups, kwargs), choice


def check_optimizer(config, device: torch.device) -> OptimizerChoice:
    """Builds the optimiser the run on ``device`` will use once, over a stand-in parameter on the
    CPU, before any model loads, so a missing package or a wrong argument stops the run in seconds
    (and a run whose AdamW8bit becomes torch's AdamW does not spend seconds importing bitsandbytes)."""
    choice, kwargs = _choice_for(config, device)
    probe = torch.zeros(1, requires_grad=True)
    _construct(choice, [{"params": [probe], "lr": max(config.unet_lr, config.text_encoder_lr)}], kwargs)
    return choice


def build_scheduler(config, optimizer, total_steps: int, warmup_steps: int):
    name = config.lr_scheduler
    if relative_step(config):
        # Reports Adafactor's own rates; it takes no schedule from outside.
        return AdafactorSchedule(optimizer, initial_lr=float(config.unet_lr))
    if name == "cosine_with_restarts":
        return get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, num_cycles=config.lr_scheduler_num_cycles
        )
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, power=float(config.lr_scheduler_num_cycles)
        )
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class DeviceLearningRates:
    """Keeps each parameter group's learning rate in a device tensor that a captured optimiser step
    reads, and copies the scheduler's value into it after every scheduler step (newer torch fills a
    tensor lr in place itself; older torch writes a float, which a graph would never see)."""

    def __init__(self, optimizer, device: torch.device):
        self.optimizer = optimizer
        self.tensors = []
        if not all(group.get("capturable") for group in optimizer.param_groups):
            return
        for group in optimizer.param_groups:
            tensor = torch.tensor(float(group["lr"]), device=device)
            group["lr"] = tensor
            self.tensors.append(tensor)

    def sync(self) -> None:
        for group, tensor in zip(self.optimizer.param_groups, self.tensors):
            if group["lr"] is not tensor:
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor

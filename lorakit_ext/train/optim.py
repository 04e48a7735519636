"""Optimiser and learning-rate schedule for a run, from ``TrainConfig``."""

from __future__ import annotations

import importlib
import logging

import torch
from transformers import get_scheduler
from transformers.optimization import (
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from lorakit_ext.errors import UserError

log = logging.getLogger(__name__)

# Optional optimisers: (module, class, pip package).
_OPTIONAL = {
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}


def _optional_class(name: str):
    module, cls, package = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except Exception as exc:  # bitsandbytes raises RuntimeError/OSError on machines without CUDA
        raise ModuleNotFoundError(f"{name} needs the '{package}' package ({exc})") from None


def build_optimizer(config, groups: list[dict], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """Returns the optimiser and the name actually used (AdamW8bit falls back to AdamW)."""
    betas = (config.adam_beta1, config.adam_beta2)
    name = config.optimizer
    if name == "AdamW8bit":
        try:
            return _optional_class(name)(groups, betas=betas, weight_decay=config.weight_decay), name
        except ModuleNotFoundError as exc:
            log.info("%s; using torch AdamW instead (same update, 32-bit state)", exc)
            name = "AdamW"
    if name == "AdamW":
        cuda = device.type == "cuda"
        # Fused and capturable on CUDA: one kernel for all LoRA weights, and no host sync, so the
        # step can live in a CUDA graph.
        return torch.optim.AdamW(groups, betas=betas, weight_decay=config.weight_decay, fused=cuda, capturable=cuda), name
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # kohya-colab's recommended arguments: a fixed learning rate driven by our scheduler.
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=config.weight_decay), name
    try:
        cls = _optional_class(name)
    except ModuleNotFoundError as exc:
        raise UserError(f"optimizer {name} is not available: {exc}; install it or choose AdamW") from None
    return cls(groups, betas=betas, weight_decay=config.weight_decay), name


def build_scheduler(config, optimizer, total_steps: int, warmup_steps: int):
    name = config.lr_scheduler
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

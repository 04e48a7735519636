"""Resumable training state: saved after every epoch and on interrupt, loaded by ``--resume``.

Everything that decides the remaining loss sequence is in it: LoRA weights, optimiser, scheduler,
loss scaler, position (epoch, step) and the RNGs (the device one draws the noise and timesteps).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.train.record import STATE_FILE


@dataclass
class Position:
    epoch: int  # 0-based epoch being trained
    step_in_epoch: int  # batches of that epoch already done
    global_step: int


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_state(run_dir: Path, *, network, optimizer, scheduler, scaler_state: dict | None, position: Position, device: torch.device, config: dict, losses: list[float], files: list[Path],
               validation: list[tuple[int, int, float]] = ()) -> Path:
    state = {
        "format": 1,
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": _class_name(optimizer),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler_state,
        "position": vars(position),
        "rng": _rng_state(device),
        "config": config,
        "losses": losses,
        "files": [str(f) for f in files],
        "validation": [list(row) for row in validation],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(run_dir) / STATE_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UserError(f"no resumable state in {run_dir} (a run saves it after each epoch and on interrupt)")
    try:
        # torch.serialization.load, not torch.load: A1111 replaces torch.load with a checker that
        # returns None for what it does not know. Tensors, numbers, strings and containers are all
        # the state holds, so the weights-only unpickler reads it.
        state = torch.serialization.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"resume state {path} is unreadable ({exc}); start a new run") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise UserError(f"resume state {path} has an unknown format")
    return state


def _class_name(optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _saved_optimizer(state: dict) -> str | None:
    if "optimizer_class" in state:
        return state["optimizer_class"]
    # A state from before the class was recorded: bitsandbytes' 8-bit moments are state1/state2.
    if any("state1" in s for s in state["optimizer"].get("state", {}).values()):
        return "bitsandbytes.optim.adamw.AdamW8bit"
    return None


def restore_state(state: dict, *, network, optimizer, scheduler, step, device: torch.device) -> tuple[Position, list[float]]:
    """Puts a saved run back; ``step`` is the :class:`~lorakit_ext.train.step.StepFunction`.
    :class:`UserError` when another optimiser saved the state (AdamW8bit is torch's AdamW where
    steps replay as CUDA graphs, bitsandbytes' elsewhere): one's moments mean nothing to the other."""
    saved, current = _saved_optimizer(state), _class_name(optimizer)
    if saved is not None and saved != current:
        last = state["files"][-1] if state.get("files") else None
        remedy = (f"start a new run that continues from its last epoch file (network_weights = {last})" if last
                  else "start a new run")
        raise UserError(f"this run's optimiser state was saved by {saved}, and resuming here would train with {current}, "
                        f"which cannot take it over; {remedy}")
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step.load_scaler_state(state["scaler"])
    _set_rng_state(state["rng"], device)
    return Position(**state["position"]), list(state["losses"])

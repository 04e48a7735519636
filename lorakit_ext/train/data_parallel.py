"""Data-parallel training over torch.distributed: every process (rank) holds the whole model and
the whole latent cache, trains its share of each batch, and all ranks add their LoRA gradients
together before one identical optimizer step each.

The numbers are those of one process training the total batch (per-GPU batch × ranks):
- the epoch is cut into batches of the total size, as one process would cut it, and rank ``r``
  takes rows ``[r·b, (r+1)·b)`` of each; a short last batch of a bucket leaves later ranks fewer
  rows, or none (they then run one row with loss weight 0, so the collectives still pair up);
- each rank's loss is weighted ``ranks × rows / batch rows``, so the average of the ranks'
  gradients is the gradient of the batch's mean loss;
- every rank draws the noise and timesteps of the whole batch and keeps its rows, from one random
  stream (rank 0's, handed to the others after the latents are cached).

Only LoRA gradients travel (a few MB), as one flat all-reduce inside the step, which CUDA graphs
capture with NCCL. Launched by ``torchrun`` (or ``train --gpus N``), which set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
from dataclasses import dataclass

import torch

from lorakit_ext.errors import UserError

# A rank waits this long for the others (the first epoch's latent caching of a large dataset
# included) before the run fails instead of hanging.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` of ``size``; ``distributed`` when a process group is in
    use (also with one process under torchrun, so the path is the same)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        """The rank that writes files, records and progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ=os.environ) -> "World":
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local = int(environ.get("LOCAL_RANK", rank))
        except (KeyError, ValueError):
            raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers; start several "
                            "processes with torchrun or train --gpus N") from None
        if not 0 <= rank < size:
            raise UserError(f"RANK {rank} is outside WORLD_SIZE {size}")
        return cls(rank, size, local, True)

    def device(self, asked: str | None) -> str | None:
        """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) unless ``asked`` is
        the CPU; several ranks never share an asked-for GPU."""
        if not self.distributed or (asked or "").startswith("cpu"):
            return asked
        if asked in (None, "auto") and not torch.cuda.is_available():
            return "cpu"
        if asked and asked not in ("cuda", "auto"):
            raise UserError(f"--device {asked} with several processes: each takes its own GPU (cuda:LOCAL_RANK); "
                            "choose the GPUs with CUDA_VISIBLE_DEVICES, or use --device cpu")
        return f"cuda:{self.local_rank}"

    @contextlib.contextmanager
    def process_group(self, device: torch.device):
        """The process group for the run (NCCL on CUDA, gloo on the CPU), torn down afterwards."""
        if not self.distributed:
            yield
            return
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
            options = {"rank": self.rank, "world_size": self.size, "timeout": TIMEOUT}
            # torch 2.3 and later bind the group to the rank's GPU at once (no guessing it later).
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                options["device_id"] = device
            dist.init_process_group("nccl", **options)
        else:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self, when: bool = True):
        """Rank 0 runs the block before the others (``when``): what it writes, they read."""
        if not (self.distributed and when):
            yield
            return
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


@dataclass(frozen=True)
class Rows:
    """This rank's rows of a batch: ``count`` rows from ``start`` of ``total``; the noise of all
    ``total`` rows is drawn and these kept."""

    total: int
    start: int
    count: int


def rank_share(batch, world: World, per_rank: int):
    """``(this rank's part of batch, its Rows)`` for a batch of the total size, with each row's loss
    weight scaled so the ranks' mean gradient is the whole batch's (module docstring)."""
    total = batch.latents.shape[0]
    start = min(world.rank * per_rank, total)
    count = min(per_rank, total - start)
    base = batch.loss_weights if batch.loss_weights is not None else torch.ones(total)
    if count == 0:
        # Nothing left for this rank: one row that counts for nothing keeps its collectives paired.
        rows, weights = Rows(total, 0, 1), torch.zeros(1)
    else:
        rows = Rows(total, start, count)
        weights = base[start : start + count] * (world.size * count / total)
    picked = range(rows.start, rows.start + rows.count)
    part = dataclasses.replace(
        batch,
        latents=batch.latents[rows.start : rows.start + rows.count],
        captions=[batch.captions[i] for i in picked],
        indices=tuple(batch.indices[i] for i in picked),
        flipped=tuple(batch.flipped[i] for i in picked),
        sizes=batch.sizes[rows.start : rows.start + rows.count],
        loss_weights=None if bool((weights == 1).all()) else weights,
    )
    return part, rows


class GradientSync:
    """Averages the LoRA gradients over the ranks: one all-reduce of one flat buffer, in the step
    (so a CUDA graph captures it)."""

    def __init__(self, world: World):
        self.world = world

    def __call__(self, grads: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world.size)
        parts = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(grads, parts)
        else:  # torch before 2.2
            for g, part in zip(grads, parts):
                g.copy_(part)


def agree(world: World, losses: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
    """The mean of the ranks' ``losses`` (each rank's losses already weighted as its share), and
    whether any rank asked to stop: one collective, at the host sync that reads the losses anyway."""
    if not world.distributed:
        return losses, stop
    import torch.distributed as dist

    buffer = torch.cat([losses.float().reshape(-1), torch.tensor([1.0 if stop else 0.0], device=losses.device)])
    dist.all_reduce(buffer)
    return buffer[:-1] / world.size, bool(buffer[-1] > 0)


def share_parameters(world: World, params) -> None:
    """Rank 0's LoRA weights on every rank (they start equal from the seed; this makes it certain)."""
    if world.distributed:
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)


def share_rng(world: World, device: torch.device) -> None:
    """Rank 0's random stream on every rank, so all draw the same noise and timesteps."""
    if not world.distributed:
        return
    state = world.broadcast(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)

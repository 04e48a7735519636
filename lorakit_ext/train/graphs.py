"""Training steps captured in CUDA graphs: one graph per (batch, latent size, text layout, place in a
gradient-accumulation group).

Small-batch LoRA training is bound by the CPU launching thousands of small kernels per step (about
6 000 for SD1.5; the README's "Speed and memory" has the measurements); replaying a captured step
launches them all at once. A bucket's first batches run eagerly as warm-up (allocating gradients and
optimiser state, choosing kernels), then the step is captured and replayed. All graphs share one
memory pool, and once it exists later shapes warm up inside it too, so a new bucket's eager
activations reuse the pool's memory instead of sitting beside it. Whenever capture is impossible or
fails, the trainer falls back to the eager step — the same function — and says why once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter

import torch

from lorakit_ext.train.gpu_memory import cuda_index
from lorakit_ext.train.step import settings_sync_reason

log = logging.getLogger(__name__)

WARMUP_STEPS = 3
NOT_CUDA = "not a CUDA device"
OFF = "turned off (cuda_graphs = False)"


def settings_keep_eager(config, device: torch.device) -> str | None:
    """Why the device or the run's settings alone keep its steps out of CUDA graphs, whatever the
    optimiser (the optimiser is chosen knowing this), or None."""
    if device.type != "cuda":
        return NOT_CUDA
    if not config.cuda_graphs:
        return OFF
    return settings_sync_reason(config)


def _parts(text) -> list[torch.Tensor]:
    """The step's text input as a list of tensors: token ids, or cached text states (a dict)."""
    return [text[k] for k in sorted(text)] if isinstance(text, dict) else [text]


def _mapped(text, fn):
    return {k: fn(v) for k, v in text.items()} if isinstance(text, dict) else fn(text)


def _pool_routing():
    """torch's calls that send one stream's allocations to a private pool (the one that ends it
    has had two names), or None where this torch has none."""
    begin = getattr(torch._C, "_cuda_beginAllocateCurrentStreamToPool", None)
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    return (begin, end, release) if begin and end and release else None


@contextlib.contextmanager
def _allocating_to(pool, device: torch.device):
    """The current stream's allocations come from ``pool``: those of the backward pass too, which
    runs on the stream of its forward."""
    begin, end, release = _pool_routing()
    index = cuda_index(device)
    begin(index, pool)
    try:
        yield
    finally:
        end(index, pool)
        release(index, pool)


def _pool_live_bytes(pool) -> int | None:
    """The bytes of live tensors in ``pool``; None where torch's snapshot cannot tell (the pool
    always holds the graphs' outputs, so no segment found means no answer)."""
    segments = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == tuple(pool)]
    return sum(s["active_size"] for s in segments) if segments else None


class _Graph:
    def __init__(self, graph, latents, text, sizes, weights, loss):
        self.graph, self.latents, self.text, self.sizes, self.weights, self.loss = graph, latents, text, sizes, weights, loss


class GraphedStep:
    def __init__(self, step, *, warmup: int = WARMUP_STEPS, on_fallback=None):
        self.step = step
        self.warmup = warmup
        self.on_fallback = on_fallback or (lambda reason: None)
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: Counter = Counter()
        self.pool = None
        # Per capture: the batch's latent shape, its place in an accumulation group, its warm-up
        # steps' seconds (the first one includes choosing kernels, and compiling with
        # --compile-blocks) and the GiB its capture added to the one pool every graph shares (0 once
        # a larger shape set it up).
        self.pools: list[dict] = []
        self.warmup_s: dict[tuple, list[float]] = {}
        self._side = None
        # False once a warm-up left a tensor in the pool (see _side_stream), or where torch cannot
        # route a stream's allocations.
        self.warm_in_pool = _pool_routing() is not None
        self.disabled: str | None = None
        reason = self._unsupported_reason()
        if reason in (NOT_CUDA, OFF):
            self.disabled = reason  # nothing to report: not available here, or the user's choice
        elif reason:
            self._fall_back(reason)

    def _unsupported_reason(self) -> str | None:
        reason = settings_keep_eager(self.step.config, self.step.model.device) or self.step.host_sync_reason
        if reason:
            return reason
        optimizer = self.step.optimizer
        if not all(group.get("capturable") for group in optimizer.param_groups):
            return f"{type(optimizer).__name__} is not capturable"
        return None

    def _fall_back(self, reason: str) -> None:
        self.disabled = reason
        log.info("CUDA graphs off, training eagerly: %s", reason)
        self.on_fallback(reason)

    def __call__(self, latents: torch.Tensor, text, sizes: torch.Tensor, *, weights: torch.Tensor | None = None,
                 first: bool = True, last: bool = True, rows=None) -> torch.Tensor:
        """One step on ``latents`` (on the device), ``text`` (token ids on the host, or cached
        text states on the device), image ``sizes`` and loss ``weights`` (on the host; None: all 1);
        ``first``/``last``: where the batch sits in its gradient-accumulation group; ``rows``: which
        rows of a data-parallel batch these are (:class:`~lorakit_ext.train.step.StepFunction`)."""
        flags = {"first": first, "last": last, "rows": rows}
        if self.disabled:
            return self._eager(latents, text, sizes, weights, flags)
        key = (tuple(latents.shape), tuple(tuple(part.shape) for part in _parts(text)), weights is not None, first, last, rows)
        graph = self.graphs.get(key)
        if graph is None:
            if self.seen[key] < self.warmup:
                self.seen[key] += 1
                started = time.perf_counter()
                loss = self._side_stream(latents, text, sizes, weights, flags)
                torch.cuda.current_stream().synchronize()  # a few warm-up steps only: their time is the record
                self.warmup_s.setdefault(key, []).append(round(time.perf_counter() - started, 3))
                return loss
            try:
                graph = self._capture(key, latents, text, sizes, weights, flags)
            except Exception as exc:  # any capture failure: eager is always correct
                torch.cuda.synchronize()
                self._fall_back(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                return self._eager(latents, text, sizes, weights, flags)
        graph.latents.copy_(latents)
        for static, part in zip(_parts(graph.text), _parts(text)):
            static.copy_(part, non_blocking=True)
        graph.sizes.copy_(sizes, non_blocking=True)
        if weights is not None:
            graph.weights.copy_(weights, non_blocking=True)
        graph.graph.replay()
        return graph.loss.clone()

    def _eager(self, latents, text, sizes, weights, flags) -> torch.Tensor:
        device = latents.device
        return self.step(latents, _mapped(text, lambda t: t.to(device, non_blocking=True)), sizes.to(device, non_blocking=True),
                         weights=None if weights is None else weights.to(device, non_blocking=True), **flags)

    def _stream(self) -> torch.cuda.Stream:
        # One side stream for every warm-up and capture: cached memory belongs to a stream (a new
        # stream per step would cache a fresh copy of the step's activations each time), and
        # cuBLAS keeps a 32 MiB workspace per thread and stream for the life of the process.
        if self._side is None:
            # Blocks cached by the setup (latent caching, injection) belong to the default stream
            # and would sit beside the side stream's own: give them back first.
            torch.cuda.empty_cache()
            self._side = torch.cuda.Stream()
        return self._side

    def _side_stream(self, latents, text, sizes, weights, flags) -> torch.Tensor:
        # Warm-up on a side stream, as CUDA graph capture requires of the work it will record.
        stream = self._stream()
        stream.wait_stream(torch.cuda.current_stream())
        pool = self.pool if self.warm_in_pool else None
        live = _pool_live_bytes(pool) if pool is not None else None
        if live is None:
            pool = None
        with torch.cuda.stream(stream):
            with _allocating_to(pool, latents.device) if pool is not None else contextlib.nullcontext():
                loss = self._eager(latents, text, sizes, weights, flags)
            if pool is not None:
                # The caller keeps losses across later replays, which reuse the pool's free memory.
                loss = loss.clone()
        torch.cuda.current_stream().wait_stream(stream)
        if pool is not None and _pool_live_bytes(pool) > live:
            # Something the step keeps (state created lazily for this shape) now lives in memory the
            # earlier graphs write to when they replay: those graphs go, and later ones get a new pool.
            log.info("a warm-up step kept memory in the graphs' pool: recapturing in a new pool, later shapes warm up outside it")
            self.graphs.clear()
            self.pool = None
            self.warm_in_pool = False
        return loss

    def _capture(self, key, latents, text, sizes, weights, flags) -> _Graph:
        static_latents = latents.clone()
        static_text = _mapped(text, lambda t: t.to(latents.device).clone())
        static_sizes = sizes.to(latents.device).clone()
        static_weights = None if weights is None else weights.to(latents.device).clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # The warm-up's activations sit cached in the side stream's blocks; hand them back so the
        # graph's pool reuses that memory instead of adding to it.
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved()
        reserved_peak = torch.cuda.max_memory_reserved()
        with torch.cuda.graph(graph, pool=self.pool, stream=self._stream()):
            static_loss = self.step(static_latents, static_text, static_sizes, weights=static_weights, **flags)
        if self.pool is None:
            self.pool = graph.pool()
        entry = _Graph(graph, static_latents, static_text, static_sizes, static_weights, static_loss)
        self.graphs[key] = entry
        now = torch.cuda.memory_reserved() / 2**30
        added = now - reserved / 2**30
        self.pools.append({"latents": list(key[0]), "first": flags["first"], "last": flags["last"],
                           "warmup_s": self.warmup_s.get(key, []), "pool_added_gib": round(added, 3), "reserved_gib": round(now, 3),
                           # the peaks before and after the capture: whether the warm-ups or the capture set them
                           "reserved_peak_before_gib": round(reserved_peak / 2**30, 3),
                           "reserved_peak_after_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)})
        log.info("captured the training step for batch shape %s; memory pool +%.2f GiB (%.2f GiB reserved)", key[0], added, now)
        return entry

    def release(self) -> None:
        """Frees the graphs and their memory pool (called when the run ends, whatever the outcome)."""
        self.graphs.clear()
        self.pool = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            # cuBLAS keeps a workspace per stream it ran on (the warm-up and capture streams here)
            # outside empty_cache's reach.
            getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
            torch.cuda.empty_cache()

"""Where a training step's device time goes, kernel by kernel and by kind: GEMM, attention,
convolution, norm, optimizer, elementwise/copy/cast.

A captured step replays exactly the kernels of an eager step with the launch gaps removed, so an
eager step's summed kernel time is the floor a graph can reach; ``bench train --kernel-breakdown``
puts it beside each row's it/s, and ``dev/profile_step.py`` prints the top kernels too. On the CPU
the same breakdown sorts torch's operators (a check of the tool, not a figure to quote).
"""

from __future__ import annotations

import collections
import re

import torch

# First match wins: attention before GEMM (flash kernels contain "gemm"), convolution before GEMM
# (cuDNN's implicit GEMMs); on the CPU, torch's operator names (aten::addmm, aten::convolution …).
KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)"),
    ("convolution", r"conv|implicit_gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|dgrad|wgrad|fprop|winograd|cutlass.*conv"),
    ("GEMM", r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul|addmm|aten::mm$|aten::bmm$|aten::linear"),
    ("norm", r"norm"),
    ("optimizer", r"adam|multi_tensor|foreach|_fused"),
    ("elementwise/copy/cast", r"elementwise|vectorized|reduce|copy|cat|fill|index|unrolled|aten::(add|mul|sub|div|silu|gelu|to|_to_copy|clone|contiguous|permute|transpose|view|reshape|sum|mean|pow|exp|neg|where)"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def breakdown(events: list[tuple[str, float, int]], steps: int) -> dict:
    """``events``: ``(kernel or operator name, self time in µs over all steps, calls)``; the time
    per step in ms by kind (largest first), the total, the floor it implies and the top kernels."""
    kinds: collections.Counter = collections.Counter()
    for name, micros, _ in events:
        kinds[kind_of(name)] += micros / steps / 1000
    total = sum(kinds.values())
    top = sorted(events, key=lambda e: -e[1])[:25]
    return {
        "step_ms": total,
        "floor_it_s": 1000 / total if total else None,
        "kinds_ms": dict(kinds.most_common()),
        "top": [{"name": name, "ms": micros / steps / 1000, "calls": calls // steps} for name, micros, calls in top],
    }


class StepProfiler:
    """A ``Trainer`` progress hook that profiles optimizer steps ``first`` … ``last - 1``: on CUDA the
    kernels' device time, on the CPU the operators' own time."""

    def __init__(self, device: torch.device, first: int, last: int):
        from torch.profiler import ProfilerActivity, profile

        self.device, self.first, self.last = device, first, last
        cuda = device.type == "cuda"
        self._profile = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
        self.result: dict | None = None

    def __call__(self, progress) -> None:
        if progress.phase != "training" or progress.message:
            return
        if progress.step in (self.first, self.last) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if progress.step == self.first:
            self._profile.__enter__()
        elif progress.step == self.last:
            self._profile.__exit__(None, None, None)
            self.result = breakdown(self._events(), self.last - self.first)

    def _events(self) -> list[tuple[str, float, int]]:
        cuda = self.device.type == "cuda"
        events = []
        for e in self._profile.key_averages():
            micros = e.self_device_time_total if cuda else e.self_cpu_time_total
            if micros > 0 and (cuda or e.key.startswith("aten::")):
                events.append((e.key, float(micros), int(e.count)))
        return events

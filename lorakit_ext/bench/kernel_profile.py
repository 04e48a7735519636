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


ELEMENTWISE = "elementwise/copy/cast"
# Frames of torch's own Python (its modules' __call__, autograd's plumbing) say nothing about which
# layer asked for a copy; the caller's lines do.
_PYTHON_FRAME = re.compile(r"\.py\(\d+\): |^<string>\(\d+\): ")
_TORCH_FRAME = re.compile(r"(^|[/\\])torch[/\\]")


_BACKWARD = "autograd::engine::evaluate_function"


def _python_frames(event) -> list[str]:
    """The Python lines that led to ``event``, innermost first: the stack torch attached to it
    where it does, else the Python-function events above it in the trace (torch 2.13 records them
    so)."""
    frames = list(event.stack or ())
    if not frames:
        parent = event.cpu_parent
        while parent is not None:
            if _PYTHON_FRAME.search(parent.name):
                frames.append(parent.name)
            parent = parent.cpu_parent
    return [frame for frame in frames if not _TORCH_FRAME.search(frame)]


def _backward_node(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(_BACKWARD):
        parent = parent.cpu_parent
    return parent


def _callers(event, forward_ops: dict, depth: int = 3) -> list[str]:
    """Where ``event`` comes from: its Python lines, or for an operator of the backward pass
    (whose Python stack is only ``loss.backward()``) the lines of the forward operator it
    differentiates, marked "backward of"."""
    node = _backward_node(event)
    candidates = forward_ops.get(node.sequence_nr, []) if node is not None else []
    if not candidates:
        return _python_frames(event)[:depth]
    # Several operators share a sequence number (a cast inside the one that made the node, say):
    # SiluBackward0 differentiates aten::silu.
    differentiated = re.sub(r"Backward\d*$", "", node.name.split(": ", 1)[-1]).lower()
    forward = next((op for op in candidates if op.name[6:].replace("_", "") == differentiated), candidates[0])
    return [f"backward of {forward.name}", *_python_frames(forward)[:depth]]


def elementwise_sources(events, cuda: bool, steps: int, top: int = 20) -> list[dict]:
    """The elementwise/copy/cast time per step by torch operator and the Python lines that called
    it, largest first; ``events``: a profile's events, recorded with stacks. An operator's own
    device time is that of the kernels it launched itself."""
    events = list(events)
    # Backward nodes carry the sequence number of the forward operator that recorded them.
    forward_ops: dict[int, list] = {}
    for e in events:
        if e.name.startswith("aten::") and e.sequence_nr >= 0 and _backward_node(e) is None:
            forward_ops.setdefault(e.sequence_nr, []).append(e)
    rows: dict[tuple, list] = {}
    for e in events:
        micros = e.self_device_time_total if cuda else e.self_cpu_time_total
        if micros > 0 and e.name.startswith("aten::") and kind_of(e.name) == ELEMENTWISE:
            row = rows.setdefault((e.name, tuple(_callers(e, forward_ops))), [0.0, 0])
            row[0] += micros
            row[1] += 1
    ranked = sorted(rows.items(), key=lambda item: -item[1][0])[:top]
    return [{"op": op, "ms": micros / steps / 1000, "calls": calls // steps, "callers": list(callers)}
            for (op, callers), (micros, calls) in ranked]


class StepProfiler:
    """A ``Trainer`` progress hook that profiles optimizer steps ``first`` … ``last - 1``: on CUDA the
    kernels' device time, on the CPU the operators' own time. ``sources``: also which operators
    and Python lines the elementwise/copy/cast time comes from (slower: records every call's stack)."""

    def __init__(self, device: torch.device, first: int, last: int, *, sources: bool = False):
        from torch.profiler import ProfilerActivity, profile

        self.device, self.first, self.last, self.sources = device, first, last, sources
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda and sources else [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
        self._profile = profile(activities=activities, with_stack=sources)
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
            if self.sources:
                self.result["elementwise_sources"] = elementwise_sources(
                    self._profile.events(), self.device.type == "cuda", self.last - self.first)

    def _events(self) -> list[tuple[str, float, int]]:
        from torch.autograd import DeviceType

        cuda = self.device.type == "cuda"
        events = []
        for e in self._profile.key_averages():
            micros = e.self_device_time_total if cuda else e.self_cpu_time_total
            # On CUDA the kernels alone: with stacks recorded, the operators that launched them
            # carry the same device time again.
            if micros > 0 and (e.device_type != DeviceType.CPU if cuda else e.key.startswith("aten::")):
                events.append((e.key, float(micros), int(e.count)))
        return events

"""Peak GPU memory as ``nvidia-smi`` reports it: what the driver has handed out, CUDA context and
library workspaces included — the figure kohya's benchmarks quote and users see."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import torch


class SmiPeak:
    """Polls ``nvidia-smi`` while the block runs; ``peak_mib`` is None where it is unavailable.

    memory.used counts every process on the GPU, so run nothing else beside a benchmark.
    """

    def __init__(self, device: torch.device, interval_ms: int = 100):
        self.device = device
        self.interval_ms = interval_ms
        self.peak_mib: float | None = None
        # (seconds since entering, MiB) at each change of more than 64 MiB: where in a run the peak falls.
        self.timeline: list[tuple[float, float]] = []
        self._proc = self._thread = None

    def _gpu_id(self) -> str:
        uuid = str(getattr(torch.cuda.get_device_properties(self.device), "uuid", ""))
        if uuid:
            return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return str(self.device.index or 0)

    def __enter__(self) -> "SmiPeak":
        exe = shutil.which("nvidia-smi")
        if self.device.type != "cuda" or exe is None:
            return self
        self._proc = subprocess.Popen(
            [exe, "-i", self._gpu_id(), "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                value = float(line.strip())
            except ValueError:
                continue
            self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            if not self.timeline or abs(value - self.timeline[-1][1]) > 64:
                self.timeline.append((round(time.perf_counter() - self._started, 2), value))

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=5)

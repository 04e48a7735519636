"""Runs one of kohya sd-scripts' training scripts (``train_network.py``, ``sdxl_train_network.py``),
unchanged, in this process and writes to a JSON file when each of its optimizer steps ended and its
peak CUDA memory.

    python kohya_clock.py SD_SCRIPTS_DIR/SCRIPT.py OUT_JSON [the script's arguments …]

``bench train --kohya-sd-scripts`` starts it with the Python environment that runs sd-scripts, so
it imports nothing from LoRA Kit. kohya reads each step's loss back to the host, so a step's end
as seen here is at most one step ahead of the GPU, and a steady-state rate over many steps is exact.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time


def main() -> None:
    script, out = os.path.abspath(sys.argv[1]), sys.argv[2]
    # As if started as "python SCRIPT.py …" from its folder: it imports library/, networks/ and
    # (the SDXL script) train_network.py from there.
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, os.path.dirname(script))

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    started = time.perf_counter()
    step_ends: list[float] = []
    register_optimizer_step_post_hook(lambda *_: step_ends.append(time.perf_counter() - started))

    def report() -> None:
        record = {"step_end_s": step_ends}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            record["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            record["max_memory_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(record, fh)

    # Also after a failure: the steps done so far tell how far kohya got.
    atexit.register(report)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

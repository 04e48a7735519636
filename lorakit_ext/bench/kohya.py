"""``bench train --compare-kohya``: kohya sd-scripts' rows, run on this machine just before ours.

The kohya side is ``run_device.sh`` from ``shared/perf-anchor`` (kohya's ``train_network.py``
unchanged, on a random SD1.5 checkpoint, same settings as our rows; see the README's "Speed"
section for the carried inputs). It runs first, in its own processes, so that our process has not
touched the GPU yet and each side's nvidia-smi peak is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lorakit_ext.errors import UserError

# (train, batch) → the run_device.sh phase and the name its results carry.
PHASES = {("te", 2): ("kohya_te_b2", "te_unet_b2"), ("unet", 2): ("kohya_unet_b2", "unet_b2"), ("unet", 8): ("kohya_unet_b8", "unet_b8")}


def kohya_rows(script: str, combos: list[tuple[str, int]]) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """Runs the kohya phases matching ``combos``; returns their records and notes for the others."""
    path = Path(script)
    if not path.is_file():
        raise UserError(f"--compare-kohya: {script} is not a file (expected perf-anchor's run_device.sh)")
    wanted = [c for c in combos if c in PHASES]
    notes = [f"no kohya row for {train} b{batch} in run_device.sh" for train, batch in combos if (train, batch) not in PHASES]
    if not wanted:
        return {}, notes
    with tempfile.TemporaryDirectory(prefix="lorakit-kohya-") as tmp:
        env = {**os.environ, "OUT": f"{tmp}/out", "W": f"{tmp}/work", "BUDGET_S": os.environ.get("BUDGET_S", "100000")}
        phases = [PHASES[c][0] for c in wanted]
        print(f"kohya sd-scripts: bash {script} setup {' '.join(phases)}", file=sys.stderr, flush=True)
        done = subprocess.run(["bash", str(path), "setup", *phases], env=env, capture_output=True, text=True)
        log = Path(tmp, "out", "main.log")
        main_log = log.read_text() if log.exists() else done.stdout + done.stderr
        results = Path(tmp, "out", "results.jsonl")
        records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    by_name = {r["name"]: r for r in records if r.get("kind") == "kohya" and "it_s" in r}
    rows = {}
    for combo in wanted:
        record = by_name.get(PHASES[combo][1])
        if record is None:
            notes.append(f"kohya {PHASES[combo][0]} gave no result; its log:\n{main_log[-3000:]}")
        else:
            rows[combo] = record
    return rows, notes

"""The figures of a GPU session's runs that matter, printed from the files it brings back: each side
of ``seed_run.py``'s report (without the memory timeline), then each run record's steps, start-up
phases, epoch ends, graph pools, memory peaks and validation losses. A file a run cut short never
wrote is skipped with a line saying so.

    python dev/run_figures.py SEED_RUN_JSON RUN_RECORD_JSON...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"{path}: none ({exc})")
        return None


def main(seed_run: str, *records: str) -> None:
    report = _read(seed_run) or {}
    for side, figures in report.items():
        if isinstance(figures, dict) and side != "epochs":
            print(side, {k: v for k, v in figures.items() if k != "smi_MiB_at_s"})
    for path in records:
        r = _read(path)
        if r is None:
            continue
        print(Path(path).name, "steps", r.get("steps_done"), "phases_s", r.get("phases_s"))
        print("  epoch_end_s", [[e[k] for k in ("validation", "files_and_samples", "resume_state")] for e in r.get("epoch_end_s", [])])
        print("  graph_pools", [(p["latents"], p.get("pool_added_gib"), p.get("warmup_s")) for p in r.get("graph_pools") or []])
        print("  memory_peaks_gib", r.get("memory_peaks_gib"))
        print("  validation", [round(v["loss"], 4) for v in r.get("validation", [])],
              "run s", round(r.get("finished_at", 0) - r.get("started_at", 0), 1))


if __name__ == "__main__":
    main(*sys.argv[1:])

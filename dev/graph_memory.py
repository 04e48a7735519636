"""Where a training run's GPU memory goes, step by step (a CUDA diagnostic, not part of the tests).

Runs the real Trainer on a random full-size SD1.5 for a few steps with torch's allocation history
recorded, then prints for every step: reserved memory, the peak of live tensors inside the step,
and — at that peak — the live bytes grouped by the code that allocated them. The first steps are
the eager warm-up, the next is the capture into the graph's pool, then replays; comparing the
warm-up's peak set with the capture's shows what a graph keeps that eager does not.

    python dev/graph_memory.py --batch 2 --train te [--weights bf16] [--no-graphs]
"""

from __future__ import annotations

import argparse
import collections
import logging
import tempfile
from pathlib import Path

import torch

from lorakit_ext.bench.train import WEIGHTS, _dataset
from lorakit_ext.models.families import adapter_for
from lorakit_ext.models.tiny import build_random_sd15
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig

GIB = 2**30
OWN = ("lorakit_ext", "ldm/", "peft/", "transformers/")


def _site(frames) -> str:
    """The innermost frame in our code or a model library, plus the torch op that allocated."""
    op = next((f["name"] for f in frames if "torch/" in f["filename"]), "?")
    for f in frames:
        if any(key in f["filename"] for key in OWN):
            return f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']} [{op}]"
    return f"(torch) {op}"


def _replay(trace, marks):
    """Walks the allocation trace; per step: peak live bytes, and the live set at that peak."""
    live: dict[int, tuple[int, str]] = {}
    reserved = total = 0
    rows = []
    bounds = list(zip([0] + marks, marks + [len(trace)]))
    for start, end in bounds:
        peak, peak_set, peak_reserved = -1, {}, reserved
        for entry in trace[start:end]:
            action = entry["action"]
            if action == "alloc":
                live[entry["addr"]] = (entry["size"], _site(entry.get("frames", [])))
                total += entry["size"]
            elif action in ("free_requested", "free_completed") and entry["addr"] in live:
                total -= live.pop(entry["addr"])[0]
            elif action == "segment_alloc":
                reserved += entry["size"]
            elif action == "segment_free":
                reserved -= entry["size"]
            peak_reserved = max(peak_reserved, reserved)
            if action == "alloc" and total > peak:
                peak, peak_set = total, dict(live)
        rows.append((peak, peak_reserved, peak_set))
    return rows


def _segments(title: str) -> None:
    """Reserved memory by pool and stream, and the large segments that live blocks keep reserved."""
    segments = torch.cuda.memory._snapshot()["segments"]
    groups = collections.defaultdict(lambda: [0, 0, 0])
    for seg in segments:
        g = groups[(tuple(seg["segment_pool_id"]), seg["stream"], seg["segment_type"])]
        g[0] += 1
        g[1] += seg["total_size"]
        g[2] += seg["allocated_size"]
    print(f"\n-- {title}: reserved {torch.cuda.memory_reserved() / GIB:.2f} GiB, allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB")
    for (pool, stream, kind), (n, total, used) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"   pool {pool} stream {stream:#x} {kind:5}: {n:4} segments, {total / 2**20:8.1f} MiB reserved, {used / 2**20:8.1f} MiB in use")
    pinned = [s for s in segments if s["segment_type"] == "large" and 0 < s["allocated_size"] < s["total_size"]]
    for seg in sorted(pinned, key=lambda s: s["allocated_size"] - s["total_size"])[:12]:
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        sites = collections.Counter(_site(b.get("frames", [])) for b in live)
        print(f"   segment {seg['total_size'] / 2**20:7.1f} MiB held by {seg['allocated_size'] / 2**20:6.1f} MiB in {len(live)} blocks: "
              + "; ".join(f"{n}x {site}" for site, n in sites.most_common(3))
              + f" (requested bytes {[b.get('requested_size') for b in live][:4]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--train", choices=("te", "unet"), default="te")
    ap.add_argument("--weights", choices=tuple(WEIGHTS), default="bf16")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda")
    sd_model = build_random_sd15(device, WEIGHTS[args.weights], full=True)
    torch.cuda.synchronize()
    print(f"weights: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB, reserved {torch.cuda.memory_reserved() / GIB:.2f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        project = create_project(Path(tmp), "probe")
        _dataset(project, 16, 512)
        config = TrainConfig(
            train_batch_size=args.batch, max_train_steps=args.steps, max_train_epochs=1, num_repeats=4,
            text_encoder_lr=1e-4 if args.train == "te" else 0.0, optimizer="AdamW", keep_only_last_n_epochs=0,
            save_every_n_epochs=1000, cuda_graphs=not args.no_graphs,
        ).validate()
        model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
        job = TrainJob(config, project, project.path / "out", project.runs / "probe", patch_attention=True)
        job.run_dir.mkdir(parents=True)
        marks: list[int] = []
        reserved_at: list[float] = []

        def on_progress(p) -> None:
            if p.phase == "training" and not p.message:
                torch.cuda.synchronize()
                marks.append(len(torch.cuda.memory._snapshot()["device_traces"][0]))
                reserved_at.append(torch.cuda.memory_reserved() / GIB)

        from lorakit_ext.train import graphs

        capture = graphs.GraphedStep._capture

        def reported_capture(self, key, latents, text, sizes, flags):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            _segments("before the capture, cache emptied")
            entry = capture(self, key, latents, text, sizes, flags)
            _segments("after the capture")
            return entry

        graphs.GraphedStep._capture = reported_capture
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        Trainer(model, job, on_progress=on_progress).run()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f"peak allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB, peak reserved {torch.cuda.max_memory_reserved() / GIB:.2f} GiB; "
          f"after the run: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB, reserved {torch.cuda.memory_reserved() / GIB:.2f} GiB")
    rows = _replay(snapshot["device_traces"][0], marks)
    names = ["before step 1 (latents, injection)"] + [f"step {i}" for i in range(1, len(rows))]
    for i, (name, (peak, peak_reserved, live)) in enumerate(zip(names, rows)):
        after = f", reserved after {reserved_at[i - 1]:.2f} GiB" if 0 < i <= len(reserved_at) else ""
        print(f"\n== {name}: live peak {peak / GIB:.2f} GiB (tracked since recording), segments peak {peak_reserved / GIB:.2f} GiB{after}")
        if i == 0 or i > 5:
            continue
        by_site = collections.Counter()
        for size, site in live.values():
            by_site[site] += size
        for site, size in by_site.most_common(args.top):
            print(f"   {size / 2**20:9.1f} MiB  {site}")


if __name__ == "__main__":
    main()

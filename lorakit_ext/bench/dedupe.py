"""How fast dedupe is on a large set, how well it finds copies of real photographs, and which Hamming
threshold separates copies from distinct images.

Speed and thresholds are measured on procedural scenes (a smooth random colour field, a "subject" of
shapes and text-like strokes, film grain) so the figures can be reproduced anywhere without a dataset;
recall and precision on the sample photographs scikit-image ships (:mod:`lorakit_ext.bench.dedupe_photos`).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from time import perf_counter

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from lorakit_ext.bench.dedupe_photos import evaluate_photos, photos_text
from lorakit_ext.dataset.dedupe import (
    DEFAULT_THRESHOLDS,
    HASH_SIZE,
    METHODS,
    build_plan,
    default_workers,
    hash_images,
    pool_map,
    popcount,
)
from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes

TARGET_S = 60.0
# Bump when the generator changes, so a cached set from an older generator is not reused.
CACHE_VERSION = "v2"
VARIANTS = ("resize", "jpeg", "crop", "brightness", "resize+jpeg", "crop+jpeg", "brightness+resize+jpeg")
# The bench makes every tenth image a copy of the first of its ten, so it has real clusters to find.
GROUP = 10


def scene(index: int, subject: int = 0, seed: int = 0) -> Image.Image:
    """Scene ``index``; another ``subject`` keeps the background and redraws everything on it."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(512, 769, 2))
    # Half the scenes are drawn like anime art (flat colours, black outlines, no grain), half like
    # photos (smooth colour field, grain): flat areas make median-based hashes flip bits on ties.
    flat = bool(rng.random() < 0.5)
    if flat:
        img = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    else:
        field = rng.integers(0, 256, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
        img = Image.fromarray(field, "RGB").resize((width, height), Image.BICUBIC)
    grain = 0 if flat else int(rng.integers(0, 10))
    outline = {"outline": (0, 0, 0), "width": 3} if flat else {}
    rng = np.random.default_rng([seed, index, subject + 1])
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(width // 20, width // 2), y0 + rng.integers(height // 20, height // 2)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour, **outline)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour, **outline)
        elif kind == 2:
            corners = rng.integers(0, (width, height), (int(rng.integers(3, 7)), 2)).tolist()
            draw.polygon([tuple(p) for p in corners], fill=colour, **outline)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(3, 30)))
    for _ in range(int(rng.integers(0, 4))):
        x, y, glyph = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(8, 24))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for g in range(int(rng.integers(4, 16))):
            for _ in range(int(rng.integers(2, 4))):
                a, b = rng.integers(0, glyph, 2), rng.integers(0, glyph, 2)
                ox = x + g * glyph
                draw.line((ox + a[0], y + a[1], ox + b[0], y + b[1]), fill=colour, width=2)
    if grain:
        noisy = np.asarray(img, np.int16) + rng.integers(-grain, grain + 1, (height, width, 1), dtype=np.int16)
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")
    return img


def near_duplicate(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int | None]:
    """A copy of ``img`` changed the ways datasets collect copies, and the JPEG quality to save it at."""
    quality = None
    for step in kind.split("+"):
        w, h = img.size
        if step == "resize":
            factor = rng.uniform(0.5, 0.75)
            img = img.resize((round(w * factor), round(h * factor)), Image.LANCZOS)
        elif step == "crop":
            dx, dy = round(w * 0.05), round(h * 0.05)
            left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
            img = img.crop((left, top, left + w - dx, top + h - dy))
        elif step == "brightness":
            img = ImageEnhance.Brightness(img).enhance(float(rng.choice([0.9, 1.1])))
        else:
            quality = int(rng.integers(60, 86))
    return img, quality


def encode(img: Image.Image, quality: int | None) -> bytes:
    buf = io.BytesIO()
    if quality is None:
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _bench_image(job: tuple[Path, int]) -> None:
    path, index = job
    rng = np.random.default_rng([1, index])
    if index % GROUP == GROUP - 1:
        kind = VARIANTS[(index // GROUP) % len(VARIANTS)]
        img, quality = near_duplicate(scene(index - GROUP + 1), kind, rng)
        quality = quality or 92
    else:
        img, quality = scene(index), int(rng.integers(85, 96))
    atomic_write_bytes(path, encode(img, quality))


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit" / "bench"


def ensure_bench_images(folder: Path, n: int, workers: int) -> tuple[list[Path], int]:
    """The first ``n`` bench images in ``folder``, generating the missing ones; returns (paths, generated)."""
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    missing = [(p, i) for i, p in enumerate(paths) if not p.is_file()]
    pool_map(_bench_image, missing, workers)
    return paths, len(missing)


def run_dedupe_bench(n: int = 10000, workers: int | None = None, cache_dir: Path | None = None, reference: int = 1000, method: str = "phash") -> dict:
    """Seconds to hash and to cluster ``n`` JPEGs with a process pool, beside one process on a subset."""
    workers = workers or default_workers()
    folder = Path(cache_dir or default_cache()) / f"dedupe-{CACHE_VERSION}"
    start = perf_counter()
    paths, generated = ensure_bench_images(folder, n, workers)
    generate_s = perf_counter() - start
    start = perf_counter()
    result = hash_images(paths, method, HASH_SIZE, workers)
    hash_s = perf_counter() - start
    start = perf_counter()
    plan = build_plan(result, method, DEFAULT_THRESHOLDS[method], workers)
    cluster_s = perf_counter() - start
    subset = paths[: min(reference, n)]
    start = perf_counter()
    hash_images(subset, method, HASH_SIZE, workers=1)
    single_s = perf_counter() - start
    pool_rate, single_rate = n / hash_s, len(subset) / single_s
    return {
        "images": n,
        "method": method,
        "workers": workers,
        "cache": str(folder),
        "generated": generated,
        "generate_s": round(generate_s, 2),
        "hash_s": round(hash_s, 2),
        "cluster_s": round(cluster_s, 3),
        "total_s": round(hash_s + cluster_s, 2),
        "target_s": TARGET_S,
        "images_per_s": round(pool_rate, 1),
        "single_process": {"images": len(subset), "seconds": round(single_s, 2), "images_per_s": round(single_rate, 1)},
        "pool_speedup": round(pool_rate / single_rate, 2),
        "clusters_found": len(plan.clusters),
        "clusters_expected": n // GROUP,
        "unreadable": len(result.errors),
    }


def _calibration_files(job: tuple[Path, int, int]) -> list[tuple[str, int, str]]:
    """Writes one source scene, its copies and its same-background relatives: (name, source, role)."""
    folder, source, seed = job
    rng = np.random.default_rng([seed, source, 99])
    original = scene(source, seed=seed)
    images = [("original", original, None)]
    images += [(kind, *near_duplicate(original, kind, rng)) for kind in VARIANTS]
    images += [("related", scene(source, subject=s, seed=seed), None) for s in (1, 2)]
    out = []
    for n, (role, img, quality) in enumerate(images):
        name = f"{source:03d}_{n}_{role}.{'png' if quality is None else 'jpg'}"
        atomic_write_bytes(folder / name, encode(img, quality))
        out.append((name, source, role))
    return out


# Distances of every pair class at thresholds 0…TABLE_MAX, so the trade-off behind a default is visible.
TABLE_MAX = 16


def _pair_classes(rows: list[tuple[str, int, str]]) -> dict[str, np.ndarray]:
    """Boolean (i, j) masks: copies of an original (cropped ones apart, pHash sees a crop as a shift),
    same-background relatives, and images of different scenes."""
    src = np.array([r[1] for r in rows])
    role = np.array([r[2] for r in rows])
    same = src[:, None] == src[None, :]
    upper = np.triu(np.ones_like(same), 1)
    from_original = same & (role == "original")[:, None]
    cropped = np.array(["crop" in r[2] for r in rows])
    copy = ~np.isin(role, ("original", "related"))
    return {
        "copies": from_original & (copy & ~cropped)[None, :],
        "cropped_copies": from_original & cropped[None, :],
        "same_background": same & upper & (role == "related")[None, :] & np.isin(role, ("original", "related"))[:, None],
        "unrelated": ~same & upper,
    }


def _method_report(dist: np.ndarray, classes: dict[str, np.ndarray], threshold: int) -> dict:
    report = {"default_threshold": threshold}
    for name, mask in classes.items():
        d = dist[mask]
        is_copy = "copies" in name
        # For copies the worst case is the largest distance, for distinct images the smallest.
        report[name] = {
            "pairs": int(d.size),
            "max" if is_copy else "min": int(d.max() if is_copy else d.min()),
            # per threshold t: copies it misses (distance > t) or distinct pairs it merges (≤ t)
            "by_threshold": [int((d > t).sum() if is_copy else (d <= t).sum()) for t in range(TABLE_MAX + 1)],
        }
    return report


def calibrate(sources: int = 200, seed: int = 0, workers: int | None = None) -> dict:
    """Hamming distances of copies vs. distinct images for every method at hash size 8."""
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="lorakit-calibrate-") as tmp:
        folder = Path(tmp)
        jobs = [(folder, s, seed) for s in range(sources)]
        rows = [r for batch in pool_map(_calibration_files, jobs, workers) for r in batch]
        classes = _pair_classes(rows)
        report = {"sources": sources, "seed": seed, "images": len(rows), "methods": {}}
        for method in METHODS:
            hashes = hash_images([folder / r[0] for r in rows], method, HASH_SIZE, workers).hashes
            dist = popcount(hashes[:, None, :] ^ hashes[None, :, :])
            report["methods"][method] = _method_report(dist, classes, DEFAULT_THRESHOLDS[method])
    return report


def _calibration_text(report: dict) -> str:
    lines = [f"{report['images']} images from {report['sources']} scenes (seed {report['seed']}), hash size {HASH_SIZE}"]
    for method, r in report["methods"].items():
        c, k, s, u = (r[n] for n in ("copies", "cropped_copies", "same_background", "unrelated"))
        lines += [
            f"{method}: copies ≤ {c['max']}, 5 % crops ≤ {k['max']}, same background ≥ {s['min']}, "
            f"unrelated ≥ {u['min']}; default threshold {r['default_threshold']}",
            f"  {'t':>3} {'copies missed':>14} {'crops missed':>13} {'same-bg merged':>15} {'unrelated merged':>17}",
        ]
        lines += [
            f"  {t:>3} {c['by_threshold'][t]:>8}/{c['pairs']:<5} {k['by_threshold'][t]:>7}/{k['pairs']:<5} "
            f"{s['by_threshold'][t]:>9}/{s['pairs']:<5} {u['by_threshold'][t]:>9}/{u['pairs']:<7}"
            for t in range(TABLE_MAX + 1)
        ]
    return "\n".join(lines)


def _bench_text(r: dict) -> str:
    single = r["single_process"]
    verdict = "within" if r["total_s"] <= r["target_s"] else "OVER"
    return "\n".join([
        f"dedupe bench: {r['images']} JPEGs, {r['method']}, {r['workers']} workers (cache {r['cache']})",
        f"  generate  {r['generate_s']:8.2f} s  ({r['generated']} new images)",
        f"  hash      {r['hash_s']:8.2f} s  ({r['images_per_s']} images/s)",
        f"  cluster   {r['cluster_s']:8.3f} s  ({r['clusters_found']} clusters of {r['clusters_expected']} planted)",
        f"  total     {r['total_s']:8.2f} s  {verdict} the {r['target_s']:.0f} s target",
        f"  1 process {single['seconds']:8.2f} s for {single['images']} images ({single['images_per_s']} images/s); "
        f"pool speed-up {r['pool_speedup']}×",
    ])


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=10000, help="how many images to hash (default 10000)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--reference", type=int, default=1000, help="images in the single-process reference run")
    parser.add_argument("--cache", type=Path, default=None, help=f"where generated images are kept (default {default_cache()})")
    parser.add_argument("--calibrate", action="store_true", help="measure hash distances of copies vs. distinct images instead")
    parser.add_argument("--sources", type=int, default=200, help="scenes for --calibrate (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed for --calibrate and the photos' crops (default 0)")


def run_cli(args) -> tuple[dict, str]:
    if min(args.images, args.reference, args.sources) < 1:
        raise UserError("--images, --reference and --sources must be at least 1")
    if args.calibrate:
        report = calibrate(args.sources, args.seed, args.workers)
        return report, _calibration_text(report)
    report = run_dedupe_bench(args.images, args.workers, args.cache, args.reference)
    report["photos"] = evaluate_photos(args.seed, args.workers)
    return report, _bench_text(report) + "\n" + photos_text(report["photos"])


BENCH_CLI = {"dedupe": (add_arguments, run_cli)}

"""Dedupe's cluster recall and precision on real photographs, with the copies a dataset collects and
the look-alikes it must keep apart.

The photographs are the samples scikit-image ships inside its wheel (nothing is downloaded). Each
becomes a planted cluster: the original as PNG and four copies (resized to 2/3, re-encoded as JPEG
at quality 55, cropped by 5 % on each axis at a seeded offset, brightened by 12 %). The hard
negatives must stay out of every cluster: mirrored photos, the right frame of the stereo pair whose
left frame is planted, and two overlapping framings (70 % windows at opposite corners) of three
photos, a second shot of the same subject.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from lorakit_ext.dataset.dedupe import DEFAULT_METHOD, DEFAULT_THRESHOLDS, HASH_SIZE, DedupePlan, build_plan, hash_images
from lorakit_ext.fsutil import atomic_write_bytes

# skimage.data loaders of photographs (drawings, charts and binary masks left out).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
MIRRORED = ("astronaut", "cat", "coffee", "rocket", "camera", "text")
REFRAMED = ("retina", "hubble_deep_field", "coffee")
FRAME = 0.7
EDITS = ("resized", "q55", "crop", "bright")


def photos_available() -> bool:
    return importlib.util.find_spec("skimage") is not None


def _photo(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle_left":
        return Image.fromarray(data.stereo_motorcycle()[0])
    if name == "motorcycle_right":
        return Image.fromarray(data.stereo_motorcycle()[1])
    return Image.fromarray(getattr(data, name)())


def _edit(img: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if edit == "resized":
        return img.resize((round(w * 2 / 3), round(h * 2 / 3)), Image.LANCZOS)
    if edit == "crop":
        dx, dy = round(w * 0.05), round(h * 0.05)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return img.crop((left, top, left + w - dx, top + h - dy))
    if edit == "bright":
        return ImageEnhance.Brightness(img).enhance(1.12)
    return img


def _save(path: Path, img: Image.Image) -> None:
    path = Path(path)
    with tempfile.SpooledTemporaryFile() as buf:
        img.save(buf, "JPEG", quality=55) if path.suffix == ".jpg" else img.save(buf, "PNG")
        buf.seek(0)
        atomic_write_bytes(path, buf.read())


def write_photo_set(folder: Path, seed: int = 0) -> dict[str, str]:
    """Writes the set into ``folder``; returns file name → source (the planted cluster it belongs to)."""
    truth = {}
    for index, name in enumerate((*PHOTOS, "motorcycle_left")):
        rng = np.random.default_rng([seed, index])
        img = _photo(name)
        for edit in ("original", *EDITS):
            file = f"{name}.png" if edit == "original" else f"{name}_{edit}.{'jpg' if edit == 'q55' else 'png'}"
            _save(folder / file, _edit(img, edit, rng))
            truth[file] = name
    negatives = {f"{n}_mirrored.png": ImageOps.mirror(_photo(n)) for n in MIRRORED}
    negatives["motorcycle_right.png"] = _photo("motorcycle_right")
    for name in REFRAMED:
        img = _photo(name)
        w, h = img.size
        fw, fh = round(w * FRAME), round(h * FRAME)
        negatives[f"{name}_frame_a.png"] = img.crop((0, 0, fw, fh))
        negatives[f"{name}_frame_b.png"] = img.crop((w - fw, h - fh, w, h))
    for file, img in negatives.items():
        _save(folder / file, img)
        truth[file] = file
    return truth


def score(plan: DedupePlan, truth: dict[str, str]) -> dict:
    """Cluster recall: planted clusters found whole (in one cluster). Cluster precision: found clusters
    holding a single source. Originals kept: recalled clusters whose kept image is the original."""
    members: dict[str, set[str]] = {}
    for file, source in truth.items():
        members.setdefault(source, set()).add(file)
    planted = {source: files for source, files in members.items() if len(files) > 1}
    found = {c.keep: {m.name for m in c.members} for c in plan.clusters}
    recalled = {s for s, files in planted.items() if any(files <= f for f in found.values())}
    impure = [sorted(f) for f in found.values() if len({truth[n] for n in f}) > 1]
    kept = {keep for keep, f in found.items() if truth[keep] in recalled}
    return {
        "planted": len(planted),
        "found": len(found),
        "recall": round(len(recalled) / len(planted), 4) if planted else 1.0,
        "precision": round((len(found) - len(impure)) / len(found), 4) if found else 1.0,
        "originals_kept": len({k for k in kept if k == f"{truth[k]}.png"}),
        "missed": sorted(set(planted) - recalled),
        "merged": impure,
        "kept_copies": sorted(k for k in kept if k != f"{truth[k]}.png"),
    }


def evaluate_photos(seed: int = 0, workers: int | None = None, method: str = DEFAULT_METHOD) -> dict:
    """The default dedupe on the photo set, scored; a reason instead when scikit-image is missing."""
    if not photos_available():
        return {"skipped": "scikit-image is not installed (pip install scikit-image)"}
    with tempfile.TemporaryDirectory(prefix="lorakit-photos-") as tmp:
        truth = write_photo_set(Path(tmp), seed)
        result = hash_images(sorted(Path(tmp) / f for f in truth), method, HASH_SIZE, workers)
        plan = build_plan(result, method, DEFAULT_THRESHOLDS[method], workers)
    negatives = sum(1 for file, source in truth.items() if file == source)
    return {"seed": seed, "images": len(truth), "hard_negatives": negatives, **score(plan, truth)}


def photos_text(r: dict) -> str:
    if "skipped" in r:
        return f"  photos    skipped: {r['skipped']}"
    whole = r["planted"] - len(r["missed"])
    lines = [
        f"  photos    cluster recall {r['recall']:.2f} ({whole} of {r['planted']} planted clusters found whole), "
        f"precision {r['precision']:.2f} ({len(r['merged'])} of {r['found']} found clusters mixed)",
        f"            {r['images']} images: scikit-image photos, 4 copies each, {r['hard_negatives']} hard negatives "
        f"(seed {r['seed']}); the original kept in {r['originals_kept']} of {whole}",
    ]
    lines += [f"            missed {name}" for name in r["missed"]]
    lines += [f"            merged {', '.join(files)}" for files in r["merged"]]
    lines += [f"            kept a copy: {name}" for name in r["kept_copies"]]
    return "\n".join(lines)

"""Measures of each epoch's column in an epoch comparison grid, read from the images alone.

Per epoch: how far its cells are from the no-LoRA cells (its effect), how close they come to the
training images, and their saturation, clipping and noise. Two flags follow from simple rules:
"no visible effect" when the effect is below :data:`NO_EFFECT_BELOW`, and "overcooked" when
clipping, noise or saturation rise clearly above both the no-LoRA cells and the training images
(the larger of the two is the reference), so a LoRA of a vivid or contrasty dataset is not flagged
for looking like its dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

NO_EFFECT = "no visible effect"
OVERCOOKED = "overcooked"

# Mean absolute RGB difference of 32×32 thumbnails: 0.02 is about 5 of 255 levels on average, well
# above JPEG and fp16 jitter (< 0.01) and below any change one would notice side by side.
NO_EFFECT_BELOW = 0.02
# 15 % of the picture newly burnt to pure black or white: a style rarely does that, a fried LoRA does.
CLIPPED_RISE = 0.15
# Twice the reference's fine-detail energy is speckle; the absolute margin keeps a very smooth
# reference (flat backgrounds, |Laplacian| ≈ 0.005) from flagging an ordinary amount of detail.
NOISE_RATIO = 2.0
NOISE_RISE = 0.02
# A quarter of the whole saturation scale above both references is past any colour grade.
SATURATION_RISE = 0.25

# Stats are taken at most at SD1.5's cell size: larger cells and photos are box-reduced first, so
# per-pixel noise of 1024-px SDXL cells and of photos is measured at a comparable scale.
STATS_SIDE = 512
THUMBNAIL_SIDE = 32
_DARK, _BRIGHT = 2, 253


@dataclass(frozen=True)
class ImageStats:
    saturation: float  # mean HSV saturation in [0, 1]
    clipped: float  # share of pixels with a channel at <= 2 or >= 253 (0..1)
    noise: float  # high-frequency energy: mean |Laplacian| of the grey image in [0,1] units


@dataclass(frozen=True)
class EpochMeasures:
    label: str  # the grid column label (an epoch file stem such as "kat-04")
    effect: float  # mean image_distance of its cells to the baseline cell of the same (seed, weight)
    likeness: float | None  # mean smallest image_distance to a training image; None without them
    saturation: float  # means over its cells
    clipped: float
    noise: float
    flags: tuple[str, ...]  # subset of (NO_EFFECT, OVERCOOKED), in that order
    reasons: tuple[str, ...]  # one sentence per flag, with the numbers that triggered it
    # Mean cosine similarity of its cells' CLIP embeddings to the nearest training image's
    # (compare.clip_likeness); None when no local CLIP model was asked for.
    clip_likeness: float | None = None


def _reduced(image: Image.Image) -> Image.Image:
    rgb = image.convert("RGB")
    scale = STATS_SIDE / min(rgb.size)
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BOX)


def image_stats(image: Image.Image) -> ImageStats:
    reduced = _reduced(image)
    pixels = np.asarray(reduced, dtype=np.int16)
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)
    clipped = ((pixels <= _DARK) | (pixels >= _BRIGHT)).any(axis=2)
    grey = np.asarray(reduced.convert("L"), dtype=np.int16)
    if min(grey.shape) < 3:
        noise = 0.0
    else:
        laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
        noise = float(np.abs(laplacian).mean()) / 255
    return ImageStats(float(saturation.mean()), float(clipped.mean()), noise)


def _thumbnail(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    small = rgb.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX, box=(left, top, left + side, top + side))
    return np.asarray(small, dtype=np.float32) / 255


def _thumbnail_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def image_distance(a: Image.Image, b: Image.Image) -> float:
    """How different two images look, in [0, 1]: the mean absolute RGB difference of their 32×32
    box-filtered centre squares.

    A square centre crop lets grid cells and training photos of any shape be compared and keeps
    the subject, which sits in the middle of most photos and cells. Box-averaging down to 32×32
    keeps composition and colour masses, which is what a LoRA changes, while sampler noise, JPEG
    artefacts and texture average away. The plain mean difference stays bounded and monotone, so
    the thresholds here read as "levels of 255 on average".
    """
    return _thumbnail_distance(_thumbnail(a), _thumbnail(b))


def _mean_stats(stats: list[ImageStats]) -> ImageStats:
    return ImageStats(*(float(np.mean([getattr(s, field) for s in stats])) for field in ("saturation", "clipped", "noise")))


def _reference(baseline: ImageStats, training: ImageStats | None) -> ImageStats:
    if training is None:
        return baseline
    return ImageStats(max(baseline.saturation, training.saturation), max(baseline.clipped, training.clipped),
                      max(baseline.noise, training.noise))


def _overcooked(stats: ImageStats, reference: ImageStats, against: str) -> str | None:
    """The sentence saying which measures rose past the reference, or None when none did."""
    parts = []
    if stats.clipped > reference.clipped + CLIPPED_RISE:
        parts.append(f"clipped share {stats.clipped:.2f} vs {reference.clipped:.2f} (limit +{CLIPPED_RISE})")
    if stats.noise > reference.noise * NOISE_RATIO and stats.noise > reference.noise + NOISE_RISE:
        parts.append(f"noise {stats.noise:.3f} vs {reference.noise:.3f} (limit ×{NOISE_RATIO:g} and +{NOISE_RISE})")
    if stats.saturation > reference.saturation + SATURATION_RISE:
        parts.append(f"saturation {stats.saturation:.2f} vs {reference.saturation:.2f} (limit +{SATURATION_RISE})")
    return f"cells went beyond {against}: {', '.join(parts)}" if parts else None


def _baseline_cell(baseline: dict, seed, weight, label: str):
    # Without a LoRA the weight changes nothing, so any baseline cell of the seed stands in.
    cell = baseline.get((seed, weight))
    if cell is None:
        cell = next((image for (s, _), image in baseline.items() if s == seed), None)
    if cell is None:
        raise ValueError(f"the grid has no baseline cell for seed {seed}, which column {label!r} uses")
    return cell


def measure_epochs(cells: dict, baseline_label: str, training_images: list, embed=None) -> list[EpochMeasures]:
    """One :class:`EpochMeasures` per non-baseline column of ``cells`` (``(column label, seed,
    weight) → image``), in first-seen column order, judged against the ``baseline_label`` column
    and the training images (may be empty). ``embed`` (a :class:`~lorakit_ext.compare.clip_likeness.ClipEmbedder`)
    adds each column's CLIP likeness."""
    baseline = {(seed, weight): image for (label, seed, weight), image in cells.items() if label == baseline_label}
    if not baseline:
        labels = ", ".join(dict.fromkeys(repr(label) for label, _, _ in cells)) or "none"
        raise ValueError(f"the grid has no baseline column {baseline_label!r} (its columns: {labels})")
    thumbnails: dict[int, np.ndarray] = {}

    def thumbnail(image: Image.Image) -> np.ndarray:
        # Each image meets many others; shrink it once.
        if id(image) not in thumbnails:
            thumbnails[id(image)] = _thumbnail(image)
        return thumbnails[id(image)]

    training = [thumbnail(image) for image in training_images or []]
    training_stats = _mean_stats([image_stats(image) for image in training_images]) if training else None
    reference = _reference(_mean_stats([image_stats(image) for image in baseline.values()]), training_stats)
    against = f'the "{baseline_label}" cells' + (" and the training images" if training else "")

    columns: dict[str, list] = {}
    for (label, seed, weight), image in cells.items():
        if label != baseline_label:
            columns.setdefault(label, []).append((image, _baseline_cell(baseline, seed, weight, label)))
    clip = {}
    if embed is not None and training_images:
        from lorakit_ext.compare.clip_likeness import clip_likeness

        clip = clip_likeness({label: [image for image, _ in pairs] for label, pairs in columns.items()}, training_images, embed)
    out = []
    for label, pairs in columns.items():
        effect = float(np.mean([_thumbnail_distance(thumbnail(image), thumbnail(base)) for image, base in pairs]))
        likeness = None
        if training:
            likeness = float(np.mean([min(_thumbnail_distance(thumbnail(image), t) for t in training) for image, _ in pairs]))
        stats = _mean_stats([image_stats(image) for image, _ in pairs])
        flags, reasons = [], []
        if effect < NO_EFFECT_BELOW:
            flags.append(NO_EFFECT)
            reasons.append(f'cells differ from the "{baseline_label}" cells by {effect:.3f} on average (below {NO_EFFECT_BELOW})')
        overcooked = _overcooked(stats, reference, against)
        if overcooked:
            flags.append(OVERCOOKED)
            reasons.append(overcooked)
        out.append(EpochMeasures(label, effect, likeness, stats.saturation, stats.clipped, stats.noise, tuple(flags), tuple(reasons),
                                 clip.get(label)))
    return out

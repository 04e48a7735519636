"""Which image of a near-duplicate cluster to keep: the original, not a copy someone edited.

The rule narrows the cluster step by step; a step keeps every image within its tolerance of the best,
so small measurement noise never decides, and the next step looks only at what is left:

1. most pixels, within ``RESOLUTION_TOLERANCE``: a resized or cropped copy has fewer;
2. a lossless file (PNG, BMP, TIFF, lossless WebP) over a lossy one (JPEG, lossy WebP, palette
   images): every re-encode loses detail;
3. tone closest to the cluster's consensus (the median of every member's mean brightness), within
   ``TONE_SHARE`` of it or ``TONE_FLOOR`` grey levels: a brightened or darkened copy stands apart;
4. fewest clipped pixels (pure black or white), within ``CLIP_TOLERANCE``: brightening and added
   contrast push highlights to white, which the original did not have;
5. camera EXIF (make, model or capture time) over none: editors and re-encoders often drop it;
6. the larger file: of two lossy files, usually the higher quality;
7. the first name, so the choice never depends on the order files were listed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median

from PIL import Image

RESOLUTION_TOLERANCE = 0.02  # a copy resized by rounding keeps "the same" resolution
# Re-encoding or resizing moves the mean grey level by well under 1 %; a brightness edit by several.
TONE_SHARE, TONE_FLOOR = 0.01, 0.5
CLIP_TOLERANCE = 0.002  # share of pixels
_MAKE, _MODEL, _EXIF_IFD, _DATE_TAKEN = 0x010F, 0x0110, 0x8769, 0x9003


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int
    size: int
    mtime_ns: int
    lossless: bool = False
    tone: float = 0.0  # mean grey level, 0–255
    clipped: float = 0.0  # share of pixels at pure black or white
    camera: bool = False  # EXIF from a camera

    @property
    def pixels(self) -> int:
        return self.width * self.height


def tone_and_clipping(grey: Image.Image) -> tuple[float, float]:
    """Mean grey level and the share of pure black or white pixels of an "L" image."""
    histogram = grey.histogram()
    total = sum(histogram) or 1
    return sum(level * n for level, n in enumerate(histogram)) / total, (histogram[0] + histogram[255]) / total


def has_camera_exif(image: Image.Image) -> bool:
    try:
        exif = image.getexif()
        return bool(exif.get(_MAKE) or exif.get(_MODEL) or exif.get_ifd(_EXIF_IFD).get(_DATE_TAKEN))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no evidence either way
        return False


def _within(members: list[int], score, tolerance: float) -> list[int]:
    """Members whose ``score`` (lower is better) is within ``tolerance`` of the best."""
    best = min(score(i) for i in members)
    return [i for i in members if score(i) <= best + tolerance]


def choose_keep(members: list[int], infos: list[ImageInfo]) -> int:
    """The member to keep, by the rule in this module's docstring."""
    consensus = median(infos[i].tone for i in members)
    most = max(infos[i].pixels for i in members)
    left = [i for i in members if infos[i].pixels >= most * (1 - RESOLUTION_TOLERANCE)]
    left = [i for i in left if infos[i].lossless] or left
    left = _within(left, lambda i: abs(infos[i].tone - consensus), max(TONE_FLOOR, TONE_SHARE * consensus))
    left = _within(left, lambda i: infos[i].clipped, CLIP_TOLERANCE)
    left = [i for i in left if infos[i].camera] or left
    return min(left, key=lambda i: (-infos[i].size, infos[i].path.name))

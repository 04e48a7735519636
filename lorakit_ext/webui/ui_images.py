"""Small upright previews of dataset images, so galleries never ship multi-megabyte originals."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps

THUMB_SIDE = 192
PREVIEW_SIDE = 640
# A cluster page shows a few dozen thumbnails and the caption editor one preview at a time; this
# keeps paging back and forth from decoding the same files again.
CACHE_SIZE = 256

_cache: OrderedDict[tuple, Image.Image] = OrderedDict()


def preview(path: Path, side: int = THUMB_SIDE) -> Image.Image:
    """``path`` EXIF-transposed, RGB, fitted into ``side``×``side``. A file that cannot be decoded
    gives a grey tile rather than breaking the page it sits on."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return Image.new("RGB", (side, side), (128, 128, 128))
    key = (str(path), stat.st_size, stat.st_mtime_ns, side)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    try:
        with Image.open(path) as img:
            img.draft("RGB", (side, side))
            image = ImageOps.exif_transpose(img).convert("RGB")
        image.thumbnail((side, side))
    except (OSError, ValueError, Image.DecompressionBombError):
        image = Image.new("RGB", (side, side), (128, 128, 128))
    _cache[key] = image
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return image

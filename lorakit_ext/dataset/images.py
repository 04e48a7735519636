"""Validating one image file and turning it into what a trainer can read.

An image is accepted only after its first frame decodes completely; a file that is already a plain
8-bit RGB/grey PNG, JPEG or WebP is kept byte-for-byte, anything else becomes a normalised PNG.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 80_000_000
# Images are decoded whole on import; a gigapixel would take gigabytes.
MAX_MEGAPIXELS = 1000
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Formats kohya, A1111 and OneTrainer read directly; BMP and GIF are rewritten as PNG.
PLAIN_FORMATS = ("PNG", "JPEG", "WEBP")
PLAIN_MODES = ("RGB", "L")
# Formats that store every pixel as it was encoded; WebP can be either (see is_lossless).
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF")
_ORIENTATION_TAG = 0x0112
# The PNG spec puts IHDR first, so the bit depth sits at a fixed offset; PIL hides it (16-bit RGB
# opens as 8-bit "RGB").
_PNG_BIT_DEPTH_AT = 24
_PIL_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


@dataclass
class ImageCheck:
    """What :func:`inspect_image` found. ``reason`` is set when the file must be rejected;
    otherwise ``conversion`` says why it cannot be stored as it is (None: store ``data`` as is)."""

    path: Path
    reason: str | None = None
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    conversion: str | None = None
    data: bytes = field(default=b"", repr=False)
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.reason is None


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image is {width}×{height} = {megapixels(width * height)}, over the limit of "
        f"{megapixels(max_pixels)} (could be a decompression bomb)"
    )


def _pil_bomb_reason(exc: Exception, max_pixels: int) -> str:
    # PIL refuses the file before we see its size; its message carries the pixel count.
    found = _PIL_BOMB.search(str(exc))
    if not found:
        return f"image is over the limit of {megapixels(max_pixels)} ({exc})"
    pixels, pil_limit = int(found.group(1)), int(found.group(2))
    return (
        f"image is {megapixels(pixels)}, over the limit of {megapixels(min(max_pixels, pil_limit))} "
        "(could be a decompression bomb)"
    )


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Reads ``path`` once and decodes its first frame fully; never raises for a bad file."""
    check = ImageCheck(Path(path))
    try:
        check.data = check.path.read_bytes()
    except OSError as exc:
        check.reason = f"cannot read the file ({exc.strerror or exc})"
        return check
    if not check.data:
        check.reason = "empty file (0 bytes)"
        return check
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires at its limit, not ours; the size check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(check.data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        check.reason = _pil_bomb_reason(exc, max_pixels)
        return check
    except Image.UnidentifiedImageError:
        check.reason = "not a PNG, JPEG, WebP, BMP or GIF image (the contents are not recognised)"
        return check
    except Exception as exc:  # noqa: BLE001 - any failure on hostile header bytes is a bad file
        check.reason = f"corrupt image header ({exc})"
        return check
    check.format, check.mode, check.size = container_format(image), image.mode, image.size
    width, height = image.size
    if width * height > max_pixels:
        check.reason = _too_large(width, height, max_pixels)
        return check
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on broken data
        check.reason = f"truncated or corrupt image data ({exc})"
        return check
    check.image = image
    check.conversion = conversion_reason(image, check.data)
    return check


def _orientation(image: Image.Image) -> int:
    try:
        if image.format == "PNG" and "exif" not in image.info and not _png_exif_after_data(image):
            return 1
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as trainers ignore it
        return 1


def _png_exif_after_data(image: Image.Image) -> bool:
    """Whether an opened PNG has an eXIf chunk after its image data. PIL finds one there only by
    decoding every pixel (``getexif`` loads the image), which made reading a dataset's sizes as slow
    as decoding it; walking the chunk headers reads a few bytes per chunk."""
    if getattr(image, "fp", None) is None:
        return False  # decoded already: PIL has read every chunk into info
    fp, at = image.fp, image.fp.tell()
    try:
        fp.seek(8)  # the PNG signature
        while True:
            header = fp.read(8)
            if len(header) < 8 or header[4:] == b"IEND":
                return False
            if header[4:] == b"eXIf":
                return True
            fp.seek(int.from_bytes(header[:4], "big") + 4, io.SEEK_CUR)  # the data and its CRC
    finally:
        fp.seek(at)


def is_sixteen_bit(image: Image.Image) -> bool:
    # PIL opens 16-bit grey PNGs as "I" (32-bit ints holding 0…65535) or "I;16*".
    return image.mode == "I" or image.mode.startswith("I;16")


def has_alpha(image: Image.Image) -> bool:
    return "A" in image.mode or "a" in image.mode or "transparency" in image.info


def container_format(image: Image.Image) -> str:
    # Phone and camera JPEGs with an extra depth map or preview open as "MPO"; every JPEG reader
    # sees their first image, so they are plain JPEGs for a trainer.
    return "JPEG" if image.format == "MPO" else image.format


def _webp_is_lossless(fp) -> bool:
    # A WebP file is a RIFF list of chunks; the first image chunk says how it was coded: "VP8L"
    # lossless, "VP8 " lossy. Animation frames ("ANMF") nest their image chunks after 16 bytes.
    fp.seek(12)
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return False
        fourcc, size = head[:4], int.from_bytes(head[4:], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        fp.seek(16 if fourcc == b"ANMF" else size + (size & 1), io.SEEK_CUR)


def is_lossless(image: Image.Image) -> bool:
    """Whether the file ``image`` was just opened from keeps every pixel as it was: PNG, BMP, TIFF or
    lossless WebP. A palette image counts as lossy: its colours were reduced to 256."""
    if image.mode in ("P", "PA"):
        return False
    fmt = container_format(image)
    if fmt == "WEBP":
        try:
            return _webp_is_lossless(image.fp)
        except (OSError, ValueError, AttributeError):
            return False
    return fmt in LOSSLESS_FORMATS


def conversion_reason(image: Image.Image, data: bytes) -> str | None:
    """Why ``image`` (decoded from ``data``) cannot be stored byte-for-byte, or None."""
    reasons = []
    fmt = container_format(image)
    if fmt not in PLAIN_FORMATS:
        reasons.append(f"{fmt} stored as PNG" + (" (first frame)" if fmt == "GIF" else ""))
    elif getattr(image, "is_animated", False) and fmt != "JPEG":
        reasons.append("animated: first frame kept")
    orientation = _orientation(image)
    if orientation != 1:
        reasons.append(f"EXIF orientation {orientation} applied")
    depth = data[_PNG_BIT_DEPTH_AT] if fmt == "PNG" else 8
    if is_sixteen_bit(image) or depth == 16:
        reasons.append("16-bit scaled to 8-bit")
    elif image.mode == "CMYK":
        reasons.append("CMYK converted to RGB")
    elif image.mode in ("P", "PA"):
        reasons.append("palette converted to RGB")
    elif image.mode in PLAIN_MODES and depth != 8:
        reasons.append(f"{depth}-bit PNG converted to 8-bit")
    elif image.mode not in PLAIN_MODES and not has_alpha(image):
        reasons.append(f"mode {image.mode} converted to RGB")
    if has_alpha(image):
        reasons.append("transparency composited on white")
    return "; ".join(reasons) or None


def _to_eight_bit(image: Image.Image) -> Image.Image:
    # convert("RGB") clips 16-bit values at 255 instead of scaling them: 65535 must become 255.
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray(((values + 128) // 257).clip(0, 255).astype(np.uint8), "L")


def normalise(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``, upright, with any transparency composited on white."""
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if is_sixteen_bit(image):
        image = _to_eight_bit(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def dataset_payload(check: ImageCheck, name: str) -> tuple[bytes, str]:
    """The bytes to store for an accepted image and the extension they need; ``name`` is the
    file name the user knows (an upload's temp path has a random one)."""
    if check.conversion is not None:
        return png_bytes(normalise(check.image)), ".png"
    source_ext = Path(name).suffix.lower()
    if check.format == "JPEG":
        return check.data, source_ext if source_ext in (".jpg", ".jpeg") else ".jpg"
    return check.data, f".{check.format.lower()}"

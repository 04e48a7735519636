"""Generated image files that importers and scanners must survive: broken ones with the reason
they must be rejected for, and odd-but-valid ones they must accept."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)
# Where make_bad_corpus puts the target of its escaping symlink: beside the folder, not in it.
OUTSIDE_SUFFIX = "-outside"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    # Noise does not compress, so cutting the file in half cuts into the pixel data.
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width``×``height``: costs bytes, not memory, until decoded."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """Writes files an import must reject into ``folder``; returns name → part of the reason.

    The escaping symlink's target is written to a sibling folder ``<folder>-outside``."""
    folder.mkdir(parents=True, exist_ok=True)
    png, jpeg = encode(noise(64, 64), "PNG"), encode(noise(64, 64), "JPEG", quality=95)
    files = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "truncated.png": (png[: len(png) // 2], "truncated or corrupt image data"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt image data"),
        "text.png": ("just some notes, not a picture\n".encode(), "not a PNG, JPEG, WebP, BMP or GIF image"),
        "random.jpg": (np.random.default_rng(1).bytes(4096), "not a PNG, JPEG, WebP, BMP or GIF image"),
        "tiff inside.png": (encode(noise(8, 8), "TIFF"), "not a PNG, JPEG, WebP, BMP or GIF image"),
        # Three sizes over the default 80 MP limit: under PIL's own warning (89.5 MP), between its
        # warning and its error (179 MP), and over its error.
        "bomb_81mp.png": (png_claiming_size(9000, 9000), "9000×9000 = 81 MP, over the limit of 80 MP"),
        "bomb_90mp.png": (png_claiming_size(10000, 9000), "10000×9000 = 90 MP, over the limit of 80 MP"),
        "bomb_400mp.png": (png_claiming_size(20000, 20000), "image is 400 MP, over the limit of 80 MP"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    outside = folder.parent / (folder.name + OUTSIDE_SUFFIX)
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    os.symlink((outside / "secret.png").resolve(), folder / "escape.png")
    expected = {name: reason for name, (_, reason) in files.items()}
    expected["escape.png"] = "symlink pointing outside the source folder"
    return expected


def _rotated_jpeg() -> bytes:
    # Stored 40×20, left half red; orientation 6 means "turn 90° clockwise to view": 20×40, red on top.
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 255, 0] + list(RED) + [0] * 762)
    image.putpixel((0, 0), 0)
    return encode(image, "PNG", transparency=0)


def _rgba() -> bytes:
    image = Image.new("RGBA", (8, 8), (*BLUE, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return encode(image, "PNG")


def _gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _mpo() -> bytes:
    # What phones and stereo cameras write: a JPEG followed by a second image; PIL calls it MPO.
    frames = [noise(16, 16, seed=5), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:])


def make_odd_but_valid(folder: Path) -> list[str]:
    """Writes files an import must accept (several only after conversion); returns their names.

    Pixel facts tests can check: ``gray16.png`` holds 0, 65535, 1000, 257 in its first row;
    ``rotated.jpg`` shows red on top once upright; ``palette_alpha.png`` and ``rgba.png`` have a
    transparent pixel at (0, 0); ``animated.gif`` starts with a red frame; the rest are plain
    (``phone.jpg`` is an MPO: a JPEG with a second image appended)."""
    folder.mkdir(parents=True, exist_ok=True)
    gray16 = np.array([[0, 65535, 1000, 257]] * 2, dtype=np.uint16)
    files = {
        "cmyk.jpg": encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        "gray16.png": encode(Image.fromarray(gray16), "PNG"),
        "palette_alpha.png": _palette_with_transparency(),
        "rgba.png": _rgba(),
        "rotated.jpg": _rotated_jpeg(),
        "animated.gif": _gif(),
        "picture.bmp": encode(Image.new("RGB", (8, 8), BLUE), "BMP"),
        "café photo ü.png": encode(noise(16, 16, seed=2), "PNG"),
        "plain.jpg": encode(noise(16, 16, seed=3), "JPEG"),
        "grey.png": encode(Image.new("L", (8, 8), 128), "PNG"),
        "photo.webp": encode(noise(16, 16, seed=4), "WEBP"),
        "phone.jpg": _mpo(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return list(files)

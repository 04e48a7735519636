"""A small synthetic "character" dataset, made without downloads.

The character ("kat3r1na": round face, red hair, green eyes, a blue top) is drawn in different
poses, sizes, backgrounds and aspect ratios, so it is consistent across images the way a real
character dataset is. The set also holds near-duplicates (resized, re-encoded, cropped copies),
captions with the usual mess (duplicate tags, missing trigger, CRLF) and files that must be
rejected on import.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

BACKGROUNDS = {
    "white background": (245, 245, 245),
    "blue background": (70, 110, 200),
    "yellow background": (235, 205, 80),
    "green background": (80, 160, 90),
    "pink background": (230, 150, 190),
}
SIZES = [(512, 512), (512, 768), (768, 512), (640, 640), (576, 832)]


@dataclass
class DemoSet:
    folder: Path
    images: list[str] = field(default_factory=list)
    near_duplicates: dict[str, str] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)


def draw_character(size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One picture of the character and the tags that describe it."""
    bg_name, bg = rng.choice(list(BACKGROUNDS.items()))
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        # Background clutter, so no two images share a layout.
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randint(10, max(12, w // 6))
        shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in bg)
        d.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    scale = rng.uniform(0.45, 0.8) * min(w, h)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.3, 0.45) * h
    head = scale * 0.28
    tags = ["1girl", "red hair", "green eyes", "blue shirt", bg_name]
    d.rectangle([cx - head * 1.1, cy + head * 0.9, cx + head * 1.1, cy + head * 3.2], fill=(40, 70, 190))
    d.ellipse([cx - head * 1.15, cy - head * 1.2, cx + head * 1.15, cy + head * 0.6], fill=(200, 40, 30))
    d.ellipse([cx - head, cy - head, cx + head, cy + head], fill=(250, 215, 180))
    for side in (-1, 1):
        ex = cx + side * head * 0.4
        d.ellipse([ex - head * 0.14, cy - head * 0.2, ex + head * 0.14, cy + head * 0.05], fill=(30, 150, 60))
    if rng.random() < 0.5:
        d.arc([cx - head * 0.4, cy + head * 0.2, cx + head * 0.4, cy + head * 0.6], 10, 170, fill=(120, 30, 30), width=3)
        tags.append("smile")
    if rng.random() < 0.4:
        d.polygon([(cx - head * 1.3, cy - head * 0.9), (cx, cy - head * 2.0), (cx + head * 1.3, cy - head * 0.9)], fill=(30, 30, 30))
        tags.append("hat")
    tags.append("upper body" if h <= w else "standing")
    return img, tags


def _save_jpeg(img: Image.Image, path: Path, quality: int = 92) -> None:
    img.save(path, "JPEG", quality=quality)


def make_demo_set(folder: Path, n_images: int = 16, seed: int = 7, trigger: str = "kat3r1na") -> DemoSet:
    """Writes the demo source folder (the user's "photos") and describes what is in it."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    demo = DemoSet(folder)
    for i in range(n_images):
        img, tags = draw_character(SIZES[i % len(SIZES)], rng)
        name = f"kat {i:02d}.png" if i % 3 == 0 else f"kat_{i:02d}.jpg"
        if name.endswith(".png"):
            img.save(folder / name)
        else:
            _save_jpeg(img, folder / name)
        demo.images.append(name)
        # Captions as people leave them: most with the trigger, some without, one duplicated tag,
        # Windows line endings, and a few images with no caption at all.
        if i % 5 == 4:
            continue
        caption_tags = ([trigger] if i % 4 else []) + tags
        if i % 6 == 1:
            caption_tags.append(tags[1])
        (folder / name).with_suffix(".txt").write_bytes((", ".join(caption_tags) + ("\r\n" if i % 2 else "")).encode())
    for i, source in enumerate(demo.images[:3]):
        original = Image.open(folder / source).convert("RGB")
        w, h = original.size
        if i == 0:
            variant = original.resize((w * 2 // 3, h * 2 // 3), Image.LANCZOS)
        elif i == 1:
            variant = original.crop((w // 40, h // 40, w - w // 40, h - h // 40))
        else:
            variant = ImageEnhance.Brightness(original).enhance(1.08)
        name = f"copy of {Path(source).stem}.jpg"
        buf = io.BytesIO()
        variant.save(buf, "JPEG", quality=80)
        (folder / name).write_bytes(buf.getvalue())
        demo.near_duplicates[name] = source
    (folder / "empty.png").write_bytes(b"")
    good = (folder / demo.images[1]).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.png").write_text("this is not an image\n")
    demo.broken = ["empty.png", "truncated.jpg", "notes.png"]
    return demo

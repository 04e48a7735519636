"""Aspect-ratio buckets, as kohya sd-scripts builds and fills them.

Pure arithmetic on ``(width, height)`` tuples, so the plan shown before training, the latent cache
and the batches all agree. Sources: ``library/model_util.py`` ``make_bucket_resolutions`` and
``library/train_util.py`` ``BucketManager.select_bucket`` / ``trim_and_resize_if_required`` /
``BaseDataset.make_buckets`` in kohya-ss/sd-scripts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from lorakit_ext.errors import UserError

Size = tuple[int, int]
Box = tuple[int, int, int, int]


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's bucket list: sides are multiples of ``step`` between ``min_reso`` and ``max_reso``
    and no bucket holds more than ``resolution²`` pixels; sorted, both orientations."""
    if step <= 0 or min_reso > max_reso:
        raise ValueError(f"bad bucket bounds: min {min_reso}, max {max_reso}, step {step}")
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        # kohya drops a width whose matching height would fall below the minimum.
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def _check_size(image_size: Size) -> None:
    width, height = image_size
    if width <= 0 or height <= 0:
        raise UserError(f"an image of {width}x{height} pixels cannot be trained on")


def assign_bucket(image_size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's, as ``BucketManager.select_bucket``:
    an image exactly a bucket's size takes that bucket; otherwise the smallest aspect-ratio error
    wins and ties go to the first bucket in sorted order (numpy ``argmin`` over kohya's sorted
    list). Images more extreme than every bucket land in the most extreme one and get cropped."""
    _check_size(image_size)
    if not buckets:
        raise ValueError("no buckets to choose from")
    ordered = sorted(buckets)
    if tuple(image_size) in ordered:
        return tuple(image_size)
    aspect = image_size[0] / image_size[1]
    return min(ordered, key=lambda b: abs(b[0] / b[1] - aspect))


def cover_size(image_size: Size, bucket: Size) -> Size:
    """The image scaled, keeping its aspect, to the smallest size covering ``bucket``, rounded as
    kohya rounds (``int(x + 0.5)``)."""
    _check_size(image_size)
    width, height = image_size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def center_crop_box(resized_size: Size, bucket: Size) -> Box:
    """``(left, top, right, bottom)`` of the centred ``bucket``-sized crop; kohya trims
    ``excess // 2`` from the left/top when ``random_crop`` is off."""
    left = (resized_size[0] - bucket[0]) // 2
    top = (resized_size[1] - bucket[1]) // 2
    return left, top, left + bucket[0], top + bucket[1]


def resize_and_crop_box(image_size: Size, bucket: Size) -> tuple[Size, Box]:
    resized = cover_size(image_size, bucket)
    return resized, center_crop_box(resized, bucket)


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def no_upscale_bucket(image_size: Size, resolution: int, step: int) -> tuple[Size, Size]:
    """``(bucket, resized_size)`` for ``bucket_no_upscale``. An image of at most ``resolution²``
    pixels is never resized: its bucket is its own size rounded down to ``step`` and the excess is
    cropped. A larger image is shrunk to about that area, rounding whichever side gives the smaller
    aspect-ratio error to ``step`` (kohya's rule). kohya ignores min/max bucket sides here."""
    _check_size(image_size)
    width, height = image_size
    aspect = width / height
    area = resolution * resolution
    if width * height > area:
        exact_w = math.sqrt(area * aspect)
        exact_h = area / exact_w
        w_first = _round_to_step(exact_w, step)
        h_for_w = _round_to_step(w_first / aspect, step)
        h_first = _round_to_step(exact_h, step)
        w_for_h = _round_to_step(h_first * aspect, step)
        # A zero side (extreme panoramas) would divide by zero in kohya; treat it as the worse fit.
        err_w = abs(w_first / h_for_w - aspect) if h_for_w else math.inf
        err_h = abs(w_for_h / h_first - aspect) if h_first else math.inf
        if err_w < err_h:
            resized = (w_first, int(w_first / aspect + 0.5))
        else:
            resized = (int(h_first * aspect + 0.5), h_first)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if not all(bucket):
        raise UserError(
            f"an image of {width}x{height} pixels is narrower than one bucket step ({step} px) "
            "with bucket_no_upscale on; remove it, crop it, or turn bucket_no_upscale off"
        )
    return bucket, resized


@dataclass(frozen=True)
class Placement:
    """Where one image goes: resized to ``resized`` (aspect kept), then ``crop_box`` cut out,
    which is exactly ``bucket`` in size."""

    bucket: Size
    resized: Size
    crop_box: Box
    aspect_error: float
    original: Size = (0, 0)  # the image's own upright size, before resizing


def sdxl_crop_ltrb(bucket: Size, original: Size) -> tuple[float, float, float, float]:
    """kohya's ``BucketManager.get_crop_ltrb``: the crop SDXL is told about, computed as Stability
    AI's preprocessing did — the image fitted *inside* the bucket, so the offsets are those of the
    letterbox, not of the centre crop the pixels actually get."""
    bucket_aspect, image_aspect = bucket[0] / bucket[1], original[0] / original[1]
    if bucket_aspect > image_aspect:
        width, height = bucket[1] * image_aspect, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_aspect
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return left, top, left + width, top + height


def size_conditioning(placement: Placement, flipped: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL's size and crop conditioning of one image, as kohya's dataset hands it to the UNet:
    ``(original h, original w, crop top, crop left, target h, target w)``; a mirrored image's
    crop is measured from the right."""
    left, top, right, _ = sdxl_crop_ltrb(placement.bucket, placement.original)
    if flipped:
        left = placement.bucket[0] - right
    width, height = placement.original
    return int(height), int(width), int(top), int(left), placement.bucket[1], placement.bucket[0]


def place_image(
    image_size: Size,
    resolution: int,
    *,
    buckets: Sequence[Size] | None,
    no_upscale: bool = False,
    step: int = 64,
) -> Placement:
    """One image's placement. ``buckets=None`` means bucketing is off: every image is resized to
    cover ``resolution × resolution`` and centre-cropped, as kohya does without ``enable_bucket``."""
    if no_upscale:
        bucket, resized = no_upscale_bucket(image_size, resolution, step)
    else:
        bucket = assign_bucket(image_size, buckets) if buckets is not None else (resolution, resolution)
        resized = cover_size(image_size, bucket)
    error = bucket[0] / bucket[1] - image_size[0] / image_size[1]
    return Placement(bucket, resized, center_crop_box(resized, bucket), error, tuple(image_size))


def steps_per_epoch(bucket_counts: Iterable[int], repeats: int, batch_size: int) -> int:
    """kohya's real number of steps: batches never mix buckets, so each bucket's last batch may
    be short, ``Σ ceil(count · repeats / batch)`` (``len(train_dataloader)``)."""
    return sum(math.ceil(count * repeats / batch_size) for count in bucket_counts)


@dataclass(frozen=True)
class BucketPlan:
    placements: tuple[Placement, ...]

    @property
    def buckets(self) -> dict[Size, list[int]]:
        """``{bucket: [image indices]}``, buckets sorted, indices ascending."""
        out: dict[Size, list[int]] = {}
        for index, placement in enumerate(self.placements):
            out.setdefault(placement.bucket, []).append(index)
        return dict(sorted(out.items()))

    def counts(self) -> dict[Size, int]:
        return dict(sorted(Counter(p.bucket for p in self.placements).items()))

    def entries(self, repeats: int | Sequence[int]) -> dict[Size, int]:
        """Each bucket's images × their repeats (one count for all, or each image's own)."""
        if isinstance(repeats, int):
            return {bucket: n * repeats for bucket, n in self.counts().items()}
        out: Counter = Counter()
        for placement, times in zip(self.placements, repeats, strict=True):
            out[placement.bucket] += times
        return dict(sorted(out.items()))

    def steps_per_epoch(self, repeats: int | Sequence[int], batch_size: int) -> int:
        return steps_per_epoch(self.entries(repeats).values(), 1, batch_size)

    @property
    def mean_aspect_error(self) -> float:
        if not self.placements:
            return 0.0
        return sum(abs(p.aspect_error) for p in self.placements) / len(self.placements)

    def describe(self, repeats: int | Sequence[int] | None = None, batch_size: int | None = None) -> str:
        """One line per bucket ("512x768: 12 images"); with ``repeats`` and ``batch_size`` a last
        line gives the real steps per epoch after bucketing."""
        lines = [f"{w}x{h}: {n} image{'' if n == 1 else 's'}" for (w, h), n in self.counts().items()]
        if repeats is not None and batch_size is not None:
            steps = self.steps_per_epoch(repeats, batch_size)
            lines.append(
                f"{len(lines)} bucket{'' if len(lines) == 1 else 's'}: {steps} steps per epoch after bucketing "
                "(a batch never mixes buckets, so a bucket's last batch may be short)."
            )
        return "\n".join(lines)

    def bucket_info(self, repeats: int | Sequence[int]) -> dict:
        """kohya's ``ss_bucket_info`` (``json.dumps`` it): counts include repeats; keys are the
        sorted bucket positions."""
        buckets = {
            str(i): {"resolution": list(bucket), "count": n}
            for i, (bucket, n) in enumerate(self.entries(repeats).items())
        }
        return {"buckets": buckets, "mean_img_ar_error": self.mean_aspect_error}


def plan_buckets(
    image_sizes: Sequence[Size],
    resolution: int,
    *,
    enable_bucket: bool = True,
    min_reso: int = 256,
    max_reso: int = 1024,
    step: int = 64,
    no_upscale: bool = False,
) -> BucketPlan:
    no_upscale = no_upscale and enable_bucket
    buckets = make_buckets(resolution, min_reso, max_reso, step) if enable_bucket and not no_upscale else None
    return BucketPlan(
        tuple(place_image(s, resolution, buckets=buckets, no_upscale=no_upscale, step=step) for s in image_sizes)
    )


def bucket_plan_for(config, image_sizes: Sequence[Size]) -> BucketPlan:
    """The bucket plan of a :class:`~lorakit_ext.train_config.TrainConfig`."""
    return plan_buckets(
        image_sizes,
        config.resolution,
        enable_bucket=config.enable_bucket,
        min_reso=config.min_bucket_reso,
        max_reso=config.max_bucket_reso,
        step=config.bucket_reso_steps,
        no_upscale=config.bucket_no_upscale,
    )

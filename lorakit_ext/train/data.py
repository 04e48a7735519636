"""Training data: dataset items, images cut to their bucket, the latent cache and epoch batches.

Behaviour follows kohya sd-scripts (``train_util.py``: ``cache_batch_latents``,
``BaseDataset.make_buckets``/``shuffle_buckets``/``__getitem__``) with one change: all randomness
comes from ``(seed, epoch, step)``, so a resumed run recreates epoch ``e`` exactly and skips to
step ``k`` (kohya reseeds per epoch but draws flips and caption shuffles from the global
``random`` state).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from lorakit_ext.dataset.captions import read_caption
from lorakit_ext.dataset.files import dataset_images
from lorakit_ext.dataset.folders import ImageFolder
from lorakit_ext.dataset.images import _orientation, normalise
from lorakit_ext.errors import UserError
from lorakit_ext.train.buckets import BucketPlan, Size, center_crop_box, cover_size, size_conditioning
from lorakit_ext.train.captions_step import process_caption
from lorakit_ext.train.events import Interrupted

Encoder = Callable[[torch.Tensor], torch.Tensor]
# EXIF orientations 5–8 rotate by 90°, so the upright image has width and height swapped.
_ROTATED = (5, 6, 7, 8)
_VAE_FACTOR = 8


@dataclass(frozen=True)
class TrainItem:
    image_path: Path
    caption: str
    size: Size  # upright (EXIF-transposed) width, height
    warning: str | None = None
    repeats: int = 1  # times it is seen per epoch
    regularisation: bool = False  # its loss counts prior_loss_weight times
    folder: str = ""  # kohya's "<repeats>_<name>" of the folder it came from, for the file's metadata


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path.name}: {exc}; remove it from the dataset or import it again") from None


def image_size(path: Path) -> Size:
    """Upright size of an image, from its header (no pixel decoding)."""
    with _open_image(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in _ROTATED else (width, height)


def _train_item(path: Path, class_tokens: str = "") -> TrainItem:
    read = read_caption(path)
    warnings = [read.warning] if read.warning else []
    if read.source is None and class_tokens:
        # kohya: an image without a caption file is captioned with its folder's class tokens.
        return TrainItem(path, class_tokens, image_size(path), "; ".join(warnings) or None)
    if read.source is None:
        warnings.append(f"{path.name} has no caption file; it trains with an empty caption")
    return TrainItem(path, read.text, image_size(path), "; ".join(warnings) or None)


def load_train_items(dataset_folder: Path) -> list[TrainItem]:
    """Every image of the dataset folder, in name order, with its caption and size. Caption
    problems (missing file, odd encoding, several lines) are in each item's ``warning``."""
    images = dataset_images(Path(dataset_folder))
    if not images:
        raise UserError(f"the dataset {dataset_folder} has no images; import some first")
    return [_train_item(path) for path in images]


def load_folder_items(folder: ImageFolder) -> list[TrainItem]:
    """The images of a further training or regularisation folder, with its repeats and kind."""
    images = dataset_images(folder.path)
    if not images:
        kind = "regularisation folder" if folder.regularisation else "image folder"
        raise UserError(f"the {kind} {folder.path} has no images; add some or remove its line")
    return [dataclasses.replace(_train_item(path, folder.class_tokens), repeats=folder.repeats,
                                regularisation=folder.regularisation, folder=folder.label) for path in images]


def check_batch_size(images: int, batch_size: int) -> None:
    """Refuses a batch larger than the dataset. kohya would quietly train smaller batches; we say
    so before the (slow) latent caching starts."""
    if batch_size > images:
        raise UserError(
            f"batch size {batch_size} is larger than the {images} image{'' if images == 1 else 's'} in the dataset; "
            f"set the batch size to at most {images}"
        )


def load_image_for_bucket(path: Path, bucket: Size, flip: bool = False, *, resized_size: Size | None = None) -> torch.Tensor:
    """The image as a ``[3, h, w]`` float tensor in [-1, 1], exactly ``bucket`` in size: upright,
    RGB (transparency on white), resized to ``resized_size`` (default: the smallest size covering
    the bucket) and centre-cropped, mirrored when ``flip``."""
    with _open_image(path) as raw:
        try:
            image = normalise(raw)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot decode image {path.name}: {exc}; remove it from the dataset or import it again") from None
    resized = resized_size or cover_size(image.size, bucket)
    if image.size != tuple(resized):
        # kohya: cv2 INTER_AREA when shrinking both sides, PIL LANCZOS otherwise; PIL's BOX filter
        # is the same area average.
        shrinking = resized[0] <= image.width and resized[1] <= image.height
        image = image.resize(resized, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    image = image.crop(center_crop_box(resized, bucket))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return torch.flip(pixels, dims=[2]) if flip else pixels


class LatentCache:
    """Every image's VAE latent (and, with flip augmentation, its mirror's), held in memory on
    the training device, so no step runs the VAE."""

    def __init__(self, latents: Sequence[torch.Tensor], flipped: Sequence[torch.Tensor] | None = None):
        self._latents = list(latents)
        self._flipped = list(flipped) if flipped is not None else None

    def __len__(self) -> int:
        return len(self._latents)

    @property
    def has_flipped(self) -> bool:
        return self._flipped is not None

    def get(self, index: int, flipped: bool = False) -> torch.Tensor:
        if flipped:
            if self._flipped is None:
                raise ValueError("this latent cache was built without flip augmentation")
            return self._flipped[index]
        return self._latents[index]

    @classmethod
    def build(
        cls,
        items: Sequence[TrainItem],
        plan: BucketPlan,
        encode: Encoder,
        *,
        vae_batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        flip_aug: bool = False,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        store=None,
    ) -> LatentCache:
        """Encodes the images bucket by bucket in batches of up to ``vae_batch_size``. ``encode``
        gets float32 CPU pixels ``[B, 3, H, W]`` in [-1, 1] and returns ``[B, C, H/8, W/8]``.
        With ``flip_aug`` the mirrored pixels are encoded too, as kohya does: a mirrored latent is
        not the latent of the mirrored image. ``should_stop`` is asked before every batch and
        raises :class:`Interrupted`; ``progress(done, total)`` follows every batch. ``store`` (a
        :class:`~lorakit_ext.train.latent_store.LatentStore`) gives the latents it has and keeps
        the ones encoded here."""
        if len(items) != len(plan.placements):
            raise ValueError(f"{len(items)} items but a bucket plan for {len(plan.placements)} images")
        latents: list[torch.Tensor | None] = [None] * len(items)
        flipped: list[torch.Tensor | None] | None = [None] * len(items) if flip_aug else None
        mirrors = (False, True) if flip_aug else (False,)
        targets = {False: latents, True: flipped}
        keys = {i: (items[i].image_path, bucket, plan.placements[i].resized) for bucket, indices in plan.buckets.items() for i in indices}
        batches: list[tuple[Size, list[int]]] = []  # what is left to encode, bucket by bucket
        for bucket, indices in plan.buckets.items():
            if store is not None:
                for i in indices:
                    kept = [store.get(*keys[i], mirror) for mirror in mirrors]
                    if all(latent is not None for latent in kept):
                        for mirror, latent in zip(mirrors, kept):
                            targets[mirror][i] = latent.to(device=device, dtype=dtype)
                indices = [i for i in indices if latents[i] is None]
            batches += [(bucket, indices[start : start + vae_batch_size]) for start in range(0, len(indices), vae_batch_size)]
        done = len(items) - sum(len(chunk) for _, chunk in batches)

        def load(i: int, bucket: Size) -> torch.Tensor:
            return load_image_for_bucket(items[i].image_path, bucket, resized_size=plan.placements[i].resized)

        loaded = _loaded_ahead(batches, load)
        try:
            for bucket, chunk in batches:
                if should_stop is not None and should_stop():
                    raise Interrupted()
                pixels = next(loaded)
                paths = [items[i].image_path for i in chunk]
                for mirror in mirrors:
                    for i, latent in zip(chunk, _encode(encode, torch.flip(pixels, dims=[3]) if mirror else pixels, paths, device, dtype)):
                        targets[mirror][i] = latent
                        if store is not None:
                            store.put(*keys[i], mirror, latent)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(items))
        finally:
            loaded.close()
        return cls(latents, flipped)


# Batches whose images are decoded and resized ahead of the VAE, by up to this many threads: PIL
# releases the GIL while it works, so the next batches' pictures are ready when the GPU is.
_LOAD_AHEAD, _LOADERS = 2, 4


def _loaded_ahead(batches: list[tuple[Size, list[int]]], load: Callable[[int, Size], torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each batch's stacked pixels, in order; a load's error comes out at its batch, and whatever
    is still queued is cancelled when the consumer stops early."""
    with ThreadPoolExecutor(min(_LOADERS, os.cpu_count() or 1), thread_name_prefix="lorakit-images") as pool:
        queued: deque[list[Future]] = deque()

        def submit(k: int) -> None:
            bucket, chunk = batches[k]
            queued.append([pool.submit(load, i, bucket) for i in chunk])

        for k in range(min(_LOAD_AHEAD, len(batches))):
            submit(k)
        try:
            for k in range(len(batches)):
                futures = queued.popleft()
                if k + _LOAD_AHEAD < len(batches):
                    submit(k + _LOAD_AHEAD)
                yield torch.stack([future.result() for future in futures])
        finally:
            for futures in queued:
                for future in futures:
                    future.cancel()


def _encode(encode: Encoder, pixels: torch.Tensor, paths: Sequence[Path], device, dtype) -> list[torch.Tensor]:
    with torch.no_grad():
        out = encode(pixels)
    batch, _, height, width = pixels.shape
    expected = (batch, height // _VAE_FACTOR, width // _VAE_FACTOR)
    if out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != expected:
        raise ValueError(f"the encoder returned {tuple(out.shape)} for pixels {tuple(pixels.shape)}")
    finite = torch.isfinite(out).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = paths[int((~finite).nonzero()[0])]
        raise UserError(
            f"the VAE returned NaN or infinite latents for {bad.name}; SD1.x VAEs overflow in fp16: "
            "start the WebUI with --no-half-vae or use a fixed fp16 VAE"
        )
    return list(out.to(device=device, dtype=dtype).unbind(0))


@dataclass(frozen=True)
class Batch:
    latents: torch.Tensor  # [B, C, h, w], all from one bucket
    captions: list[str]
    bucket: Size
    indices: tuple[int, ...]  # item indices; an image may appear twice through repeats
    flipped: tuple[bool, ...]
    # [B, 6] float32: each image's size and crop conditioning (buckets.size_conditioning), which
    # SDXL's UNet takes and SD1/SD2's ignore.
    sizes: torch.Tensor
    # [B] float32 loss weights (prior_loss_weight for regularisation images); None when all are 1.
    loss_weights: torch.Tensor | None = None


class EpochBatches:
    """The batches of one epoch, as kohya orders them: every image ``num_repeats`` times (one
    count, or each image's own) in its bucket, each bucket's entries shuffled and cut into batches,
    then the order of all batches shuffled. ``batches[k]`` is step ``k``: its flips (50 % each with flip augmentation) and
    caption shuffles come from ``(seed, epoch, k)`` alone, so any step can be recreated."""

    def __init__(
        self,
        cache: LatentCache,
        captions: Sequence[str],
        plan: BucketPlan,
        *,
        epoch: int,
        seed: int,
        batch_size: int,
        num_repeats: int | Sequence[int],
        loss_weights: Sequence[float] | None = None,
        keep_tokens: int = 0,
        shuffle_tags: bool = False,
        caption_dropout_rate: float = 0.0,
        caption_tag_dropout_rate: float = 0.0,
        caption_dropout_every_n_epochs: int = 0,
    ):
        check_batch_size(len(captions), batch_size)
        if not len(cache) == len(captions) == len(plan.placements):
            raise ValueError(f"{len(cache)} latents, {len(captions)} captions, {len(plan.placements)} placements")
        self._cache, self._captions, self._plan = cache, list(captions), plan
        repeats = [num_repeats] * len(captions) if isinstance(num_repeats, int) else list(num_repeats)
        self._loss_weights = list(loss_weights) if loss_weights is not None and any(w != 1 for w in loss_weights) else None
        self._seed, self._epoch = seed, epoch
        # kohya counts epochs from 1 when it empties every caption of each n-th one.
        dropped_epoch = caption_dropout_every_n_epochs > 0 and (epoch + 1) % caption_dropout_every_n_epochs == 0
        self._caption_args = (keep_tokens, shuffle_tags, caption_dropout_rate)
        self._caption_options = {"tag_dropout_rate": caption_tag_dropout_rate, "dropped_epoch": dropped_epoch}
        # String seeds hash with SHA-512 in ``random``, independent of PYTHONHASHSEED.
        rng = random.Random(f"lorakit-order:{seed}:{epoch}")
        order: list[tuple[Size, tuple[int, ...]]] = []
        for bucket, indices in plan.buckets.items():
            entries = [i for i in indices for _ in range(repeats[i])]
            rng.shuffle(entries)
            order += [(bucket, tuple(entries[s : s + batch_size])) for s in range(0, len(entries), batch_size)]
        rng.shuffle(order)
        self._order = order

    @classmethod
    def from_config(cls, config, cache: LatentCache, items: Sequence[TrainItem], plan: BucketPlan, epoch: int,
                    batch_size: int | None = None) -> EpochBatches:
        """The epoch of ``items`` (each with its own repeats, regularisation images weighted
        ``prior_loss_weight``) in batches of ``batch_size`` (default: the config's; data-parallel
        runs cut batches of the total size)."""
        return cls(
            cache,
            [item.caption for item in items],
            plan,
            epoch=epoch,
            seed=config.seed,
            batch_size=batch_size or config.train_batch_size,
            num_repeats=[item.repeats for item in items],
            loss_weights=[config.prior_loss_weight if item.regularisation else 1.0 for item in items],
            keep_tokens=config.keep_tokens,
            shuffle_tags=config.shuffle_tags,
            caption_dropout_rate=config.caption_dropout_rate,
            caption_tag_dropout_rate=config.caption_tag_dropout_rate,
            caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
        )

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, step: int) -> Batch:
        if not 0 <= step < len(self._order):
            raise IndexError(f"step {step} outside epoch of {len(self._order)} steps")
        bucket, indices = self._order[step]
        rng = random.Random(f"lorakit-step:{self._seed}:{self._epoch}:{step}")
        flipped = tuple(self._cache.has_flipped and rng.random() < 0.5 for _ in indices)
        captions = [process_caption(self._captions[i], *self._caption_args, rng, **self._caption_options) for i in indices]
        latents = torch.stack([self._cache.get(i, f) for i, f in zip(indices, flipped)])
        sizes = torch.tensor([size_conditioning(self._plan.placements[i], f) for i, f in zip(indices, flipped)], dtype=torch.float32)
        weights = (torch.tensor([self._loss_weights[i] for i in indices], dtype=torch.float32)
                   if self._loss_weights is not None else None)
        return Batch(latents, captions, bucket, indices, flipped, sizes, weights)

    def __iter__(self) -> Iterator[Batch]:
        return (self[step] for step in range(len(self)))

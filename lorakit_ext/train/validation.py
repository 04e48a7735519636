"""Validation loss per epoch: the same images, noise and timesteps at every epoch's end, so the
curve compares epochs and not luck.

Which images: ``validation_split`` of the dataset is held out of training (at least one image),
chosen from the seed (:func:`~lorakit_ext.train.plan.split_items`); a small dataset keeps every
image for training, and the loss is then measured on training images instead — sd-scripts' method for small
sets, still comparable across epochs because nothing random changes between them. Each image is
measured at :data:`TIMESTEPS` with noise drawn from its own seeded generator, without min-SNR
weighting (a plain mean squared error of the model's target), in eval mode (no network dropout),
and without touching the training's random streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lorakit_ext.train.buckets import BucketPlan, size_conditioning
from lorakit_ext.train.plan import MAX_VALIDATION_IMAGES

# Spread over the schedule: early steps judge detail, late ones composition.
TIMESTEPS = (100, 300, 500, 700, 900)
BATCH = 4


@dataclass(frozen=True)
class _Entry:
    latent: torch.Tensor  # [C, h, w] on the device
    caption: str
    sizes: tuple[int, ...]  # size_conditioning of the unflipped image
    seed: int


class ValidationSet:
    """The images one run validates on, with what each needs at every epoch's end."""

    def __init__(self, entries: Sequence[_Entry], held_out: bool):
        self.entries = list(entries)
        self.held_out = held_out
        # Each batch's stacked latents, size conditioning and noise at every timestep, by layout
        # (channels_last or not), made at the first epoch's end and kept: none drawn or copied to
        # the device again.
        self._inputs: dict[bool, list[tuple[list[int], torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]] = {}

    @classmethod
    def build(cls, cache, captions: Sequence[str], plan: BucketPlan, seed: int, *, held_out: bool) -> ValidationSet:
        """From a latent cache of the validation images (or of the training images) and their plan."""
        count = min(len(captions), MAX_VALIDATION_IMAGES)
        entries = [_Entry(cache.get(i), captions[i], size_conditioning(plan.placements[i], False), seed * 1_000_003 + i)
                   for i in range(count)]
        return cls(entries, held_out)

    def batches(self) -> list[list[int]]:
        """Entry indices grouped by latent shape, at most :data:`BATCH` per batch."""
        by_shape: dict[tuple, list[int]] = {}
        for index, entry in enumerate(self.entries):
            by_shape.setdefault(tuple(entry.latent.shape), []).append(index)
        return [group[s : s + BATCH] for group in by_shape.values() for s in range(0, len(group), BATCH)]

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]

    def loss_in_eval_mode(self, roots, error, text_states, *, channels_last: bool = False) -> float:
        """:meth:`loss` with the LoRA's module ``roots`` in eval mode (network dropout off), back in
        training mode for the next step."""
        for root in roots:
            root.eval()
        try:
            return self.loss(error, text_states, channels_last=channels_last)
        finally:
            for root in roots:
                root.train()

    def _batch_inputs(self, channels_last: bool) -> list[tuple[list[int], torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]:
        if channels_last not in self._inputs:
            inputs = self._inputs[channels_last] = []
            for indices in self.batches():
                batch = [self.entries[i] for i in indices]
                latents = torch.stack([e.latent for e in batch])
                if channels_last:
                    latents = latents.contiguous(memory_format=torch.channels_last)
                sizes = torch.tensor([e.sizes for e in batch], dtype=torch.float32, device=latents.device)
                noise = {t: torch.stack([_noise(e, t) for e in batch]).to(latents.device, latents.dtype) for t in TIMESTEPS}
                inputs.append((indices, latents, sizes, noise))
        return self._inputs[channels_last]

    @torch.no_grad()
    def loss(self, error, text_states, *, channels_last: bool = False) -> float:
        """The mean prediction error over every image and timestep. ``error(latents, states, sizes,
        noise, timesteps)`` is the step's per-image error; ``text_states(indices)`` gives the text
        encoders' states for those entries (once per batch, for every timestep). The sum stays on
        the device until the end: one read instead of one wait for the GPU per batch and timestep."""
        total, count = None, 0
        for indices, latents, sizes, noise in self._batch_inputs(channels_last):
            text = text_states(indices)
            for t in TIMESTEPS:
                timesteps = torch.full((len(indices),), t, device=latents.device, dtype=torch.long)
                # Each batch's float32 sum added in float64, in the order a host-side sum would take.
                part = error(latents, text, sizes, noise[t], timesteps).sum().double()
                total = part if total is None else total + part
                count += len(indices)
        return float(total) / count


def _noise(entry: _Entry, timestep: int) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(entry.seed * 1009 + timestep)
    return torch.randn(entry.latent.shape, generator=generator)

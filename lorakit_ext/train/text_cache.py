"""Each caption's text-encoder states, computed once before training (kohya's
``cache_text_encoder_outputs``).

With frozen text encoders and captions that never change between steps (no tag shuffling, no
caption dropout), every step would encode the same captions again. Computing them once lets the
step run the UNet alone and the encoders leave the GPU for the run (SDXL's two encoders hold about
1.6 GB in half precision). The states are what the step itself computes — the same function at the
same precision — so a cached run trains on the same numbers as an uncached one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lorakit_ext.models.base import TextStates
from lorakit_ext.train.events import Interrupted

# Captions per encoder call: large enough to keep a GPU busy, small enough for a CPU.
ENCODE_BATCH = 16


class TextCache:
    """The states of each distinct caption, kept on the training device; ``states(indices)`` gives
    a batch's, indexed by dataset item as :class:`~lorakit_ext.train.data.Batch` indexes them."""

    def __init__(self, per_caption: Sequence[TextStates], caption_of_item: Sequence[int]):
        self._per_caption = list(per_caption)
        self._caption_of_item = list(caption_of_item)

    def __len__(self) -> int:
        return len(self._caption_of_item)

    @property
    def captions(self) -> int:
        return len(self._per_caption)

    def states(self, indices: Sequence[int]) -> TextStates:
        chosen = [self._per_caption[self._caption_of_item[i]] for i in indices]
        return {key: torch.stack([one[key] for one in chosen]) for key in chosen[0]}

    @classmethod
    def build(
        cls,
        captions: Sequence[str],
        encode: Callable[[list[str]], TextStates],
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TextCache:
        """``encode`` maps a list of captions to batched states on the device; each distinct
        caption is encoded once. ``should_stop`` is asked before every call and raises
        :class:`Interrupted`."""
        distinct = list(dict.fromkeys(captions))
        position = {caption: i for i, caption in enumerate(distinct)}
        per_caption: list[TextStates] = []
        for start in range(0, len(distinct), ENCODE_BATCH):
            if should_stop is not None and should_stop():
                raise Interrupted()
            chunk = distinct[start : start + ENCODE_BATCH]
            batch = encode(chunk)
            # clone: a row of a batch would keep the whole batch's storage alive.
            per_caption += [{key: value[row].clone() for key, value in batch.items()} for row in range(len(chunk))]
            if progress is not None:
                progress(len(per_caption), len(distinct))
        return cls(per_caption, [position[caption] for caption in captions])

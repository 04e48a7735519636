"""The caption a training step sees, as kohya sd-scripts' ``BaseDataset.process_caption``.

Order as in kohya: caption dropout is decided first (an empty caption, nothing shuffled; also
every step of an epoch that ``caption_dropout_every_n_epochs`` names); then, with shuffling or tag
dropout on, the first ``keep_tokens`` comma-separated tags stay in place, the rest are shuffled and
each of them is then dropped with ``caption_tag_dropout_rate``. Otherwise the caption is used as
written (kohya's ``keep_tokens`` only matters then).

Not supported (kohya options LoRA Kit does not offer): ``keep_tokens_separator`` (a marker such
as ``|||`` fixing a caption prefix/suffix instead of a tag count), token warmup, wildcards and
prefix/suffix. One small difference: kohya keeps empty tags from ",," as empty entries when
shuffling; LoRA Kit drops them.
"""

from __future__ import annotations

import random

from lorakit_ext.dataset.tags import join_tags, split_tags


def process_caption(caption: str, keep_tokens: int, shuffle: bool, dropout_rate: float, rng: random.Random,
                    tag_dropout_rate: float = 0.0, dropped_epoch: bool = False) -> str:
    """This step's caption; all randomness comes from ``rng``, so a seeded ``rng`` repeats it.
    ``dropped_epoch``: an epoch ``caption_dropout_every_n_epochs`` empties every caption of."""
    # kohya draws a number only when dropout is on; doing the same keeps rng streams comparable.
    if (dropout_rate > 0 and rng.random() < dropout_rate) or dropped_epoch:
        return ""
    if not shuffle and tag_dropout_rate <= 0:
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout_rate > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout_rate]
    return join_tags(fixed + rest)

"""The caption a training step sees, as kohya sd-scripts' ``BaseDataset.process_caption``.

Order as in kohya: caption dropout is decided first (an empty caption, nothing shuffled); then,
with shuffling on, the first ``keep_tokens`` comma-separated tags stay in place and the rest are
shuffled. Without shuffling the caption is used as written (kohya's ``keep_tokens`` only matters
when shuffling).

Not supported (kohya options LoRA Kit does not offer): ``keep_tokens_separator`` (a marker such
as ``|||`` fixing a caption prefix/suffix instead of a tag count), tag dropout, token warmup,
wildcards, prefix/suffix and ``caption_dropout_every_n_epochs``. One small difference: kohya keeps
empty tags from ",," as empty entries when shuffling; LoRA Kit drops them.
"""

from __future__ import annotations

import random

from lorakit_ext.dataset.tags import join_tags, split_tags


def process_caption(caption: str, keep_tokens: int, shuffle: bool, dropout_rate: float, rng: random.Random) -> str:
    """This step's caption; all randomness comes from ``rng``, so a seeded ``rng`` repeats it."""
    # kohya draws a number only when dropout is on; doing the same keeps rng streams comparable.
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return join_tags(fixed + rest)

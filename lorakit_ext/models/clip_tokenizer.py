"""The real CLIP BPE tokenizer (SD1's text tokenizer), built offline from open_clip's vocab file.

The merges file open_clip ships is the one OpenAI's CLIP was trained with; laying it out the way
``transformers.CLIPTokenizer`` expects gives the exact SD1.5 token ids without a download
("a photo of a cat" → 49406 320 1125 539 320 2368 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Callable

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_json, atomic_write_text

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP keeps 49152 - 256 - 2 merges of the file; line 0 is a "#version" header.
MERGE_COUNT = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def find_bpe_vocab() -> Path | None:
    """open_clip's bundled BPE merges file, found without importing open_clip (which imports
    torchvision), or None when the package is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table (order matters: it is the
    order of the first 256 vocabulary entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_vocabulary(merge_lines: list[str]) -> list[str]:
    """Token strings in id order: bytes, bytes + ``</w>``, one token per merge, then BOS/EOS."""
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(line.split()) for line in merge_lines]
    tokens += [BOS, EOS]
    return tokens


def build_clip_tokenizer_files(folder: Path, bpe_path: Path | None = None) -> Path:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``folder`` so that
    ``CLIPTokenizer.from_pretrained(folder)`` loads SD1's tokenizer; returns ``folder``."""
    bpe_path = bpe_path or find_bpe_vocab()
    if bpe_path is None:
        raise UserError(
            f"the CLIP vocabulary ({BPE_FILENAME}) was not found; install open-clip-torch "
            "(pip install open-clip-torch) to build the CLIP tokenizer offline"
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merge_lines = lines[1 : MERGE_COUNT + 1]
    vocab = clip_vocabulary(merge_lines)
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"{bpe_path} gives {len(vocab)} CLIP tokens instead of {VOCAB_SIZE}; the file is not CLIP's vocabulary")
    folder = Path(folder)
    atomic_write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    # The slow tokenizer skips the first line whatever it says; the fast (Rust) one in transformers 5
    # skips it only when it is the standard "#version" header, which open_clip's file does not use.
    atomic_write_text(folder / "merges.txt", "\n".join(["#version: 0.2", *merge_lines]) + "\n")
    atomic_write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_LENGTH,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
            "errors": "replace",
        },
    )
    return folder


def load_clip_tokenizer():
    """SD1's ``CLIPTokenizer`` built in a temporary folder, or None when open_clip's vocabulary or
    transformers is not installed (callers then fall back to an estimate)."""
    if find_bpe_vocab() is None or importlib.util.find_spec("transformers") is None:
        return None
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="lorakit-clip-") as tmp:
        return CLIPTokenizer.from_pretrained(str(build_clip_tokenizer_files(Path(tmp))))


def clip_token_counter(tokenizer) -> Callable[[str], int]:
    """Counts a caption's CLIP tokens with ``tokenizer`` (BOS/EOS not counted, as in the
    75-token limit of one 77-token chunk)."""

    def count(text: str) -> int:
        # tokenize() rather than __call__: it neither truncates nor warns on long captions.
        return len(tokenizer.tokenize(text))

    return count

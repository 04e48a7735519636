"""What sits next to a promoted LoRA in A1111's Lora folder: its ``genN`` name and its card file.

A1111's Lora page reads ``<stem>.json`` as the card ("user metadata") and shows
``<stem>.preview.png`` as the picture. The card keys and the "sd version" values are the ones
A1111's own card editor writes (``extensions-builtin/Lora/ui_edit_user_metadata.py``): it lists a
card's "activation text" and "preferred weight" in the prompt it inserts, and hides a LoRA whose
"sd version" does not match the loaded model. Everything here is pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from lorakit_ext.errors import UserError

SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")
# A1111's card editor offers preferred weights on a 0..2 slider; 0 means "use the default weight".
PREFERRED_WEIGHT_RANGE = (0.0, 2.0)
CARD_SUFFIX = ".json"
PREVIEW_SUFFIX = ".preview.png"
# The files A1111 pairs with a LoRA by stem; they travel with it when it is removed.
SIDECAR_SUFFIXES = (CARD_SUFFIX, PREVIEW_SUFFIX, ".description.txt")
_GEN = re.compile(r"(0|[1-9][0-9]*)(\..*)?")


def _gen_number(name: str, prefix: str) -> int | None:
    """N of ``<prefix>N`` or ``<prefix>N.<anything>`` (a LoRA or any of its sidecars), else None."""
    if name[: len(prefix)].lower() != prefix.lower():
        return None
    match = _GEN.fullmatch(name[len(prefix) :])
    return int(match.group(1)) if match else None


def next_gen_name(folder_names: Iterable[str], output_name: str) -> str:
    """``<output_name>-genN`` with N one above the highest N in ``folder_names`` (``-gen0`` first).

    Every name counts, not just ``.safetensors``: a card or preview left behind still owns its N.
    Gaps are not refilled: infotexts of old images name ``-gen1``, and a removed ``-gen1`` may come
    back with undo, so a number once used is never given to a different file. Names are compared
    case-insensitively, as Windows and macOS file systems do.
    """
    prefix = f"{output_name}-gen"
    used = [n for n in (_gen_number(name, prefix) for name in folder_names) if n is not None]
    return f"{prefix}{max(used) + 1 if used else 0}"


def sd_version_of(metadata: dict[str, str]) -> str:
    """The "sd version" A1111 itself gives a LoRA file without a card, from its metadata."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def card_json(
    trigger: str,
    preferred_weight: float,
    sd_version: str,
    description: str,
    *,
    negative_text: str = "",
    notes: str = "",
) -> dict:
    """A card with every key A1111's card editor writes, in its order.

    ``trigger`` becomes the "activation text" A1111 adds to the prompt with the LoRA.
    """
    if sd_version not in SD_VERSIONS:
        raise UserError(f"sd version {sd_version!r} is not one of {', '.join(SD_VERSIONS)}")
    weight = float(preferred_weight)
    low, high = PREFERRED_WEIGHT_RANGE
    if not (math.isfinite(weight) and low <= weight <= high):
        raise UserError(f"preferred weight {preferred_weight} is outside A1111's range {low:g}..{high:g}")
    return {
        "description": description,
        "sd version": sd_version,
        "activation text": trigger.strip(),
        "preferred weight": weight,
        "negative text": negative_text,
        "notes": notes,
    }


def with_output_name(metadata: dict[str, str], stem: str) -> dict[str, str]:
    """``metadata`` for the same tensors saved as ``<stem>.safetensors``.

    A1111 lists a LoRA under ``ss_output_name``, so it must be the new stem; ``modelspec.title``
    follows it when present. The ``sshs_*`` hashes are dropped: the legacy one depends on the
    header's length, which changes, and the writer computes both afresh.
    """
    out = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    out["ss_output_name"] = stem
    if "modelspec.title" in out:
        out["modelspec.title"] = stem
    return out

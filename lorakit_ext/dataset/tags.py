"""Tag curation as pure functions on tag lists and caption strings, plus the caption lint.

A caption is a comma-separated list of tags (WD tagger output, or one BLIP sentence that is a
single "tag"). Tags match case-insensitively and ignoring runs of whitespace, because CLIP
lower-cases and splits on whitespace: ``Blue  Eyes`` and ``blue eyes`` train the same tokens.
The text a user wrote is kept as written; only matching is loose.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from lorakit_ext.errors import UserError

MAX_CLIP_TOKENS = 75
MODES = ("or", "and")


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def tag_key(tag: str) -> str:
    return " ".join(tag.split()).casefold()


def as_tags(value: str | Sequence[str]) -> list[str]:
    """A comma-separated string or a list of tags (entries may hold commas) as a clean tag list."""
    if isinstance(value, str):
        return split_tags(value)
    return [t for item in value for t in split_tags(item)]


def check_mode(mode: str) -> str:
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise UserError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


def dedupe_tags(tags: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            out.append(tag)
    return out


def sort_tags(tags: Sequence[str]) -> list[str]:
    return sorted(tags, key=tag_key)


def remove_tags(tags: Sequence[str], to_remove: str | Sequence[str]) -> list[str]:
    """Drops every occurrence of each tag in ``to_remove``."""
    gone = {tag_key(t) for t in as_tags(to_remove)}
    return [t for t in tags if tag_key(t) not in gone]


def search_replace(
    tags: Sequence[str], search: str | Sequence[str], replace: str | Sequence[str] = (), mode: str = "or"
) -> list[str]:
    """The Dataset Maker notebook's search & replace, made idempotent.

    Applies when ANY searched tag is present (``mode="or"``) or when ALL are (``"and"``): the
    searched tags are removed and the replacement tags that are missing are appended in the
    order given. A tag both searched and in the replacement stays where it is (the notebook
    removed and re-appended it, so each run moved it and a second run changed the caption).
    """
    mode = check_mode(mode)
    wanted = dedupe_tags(as_tags(search))
    if not wanted:
        return list(tags)
    present = {tag_key(t) for t in tags}
    hits = [tag_key(t) in present for t in wanted]
    if not (all(hits) if mode == "and" else any(hits)):
        return list(tags)
    added = dedupe_tags(as_tags(replace))
    kept = {tag_key(t) for t in added}
    dropped = {tag_key(t) for t in wanted} - kept
    out = [t for t in tags if tag_key(t) not in dropped]
    have = {tag_key(t) for t in out}
    return out + [t for t in added if tag_key(t) not in have]


def set_activation_tag(tags: Sequence[str], trigger: str | Sequence[str]) -> list[str]:
    """Puts the trigger tag(s) first, in the order given, and removes their other occurrences."""
    first = dedupe_tags(as_tags(trigger))
    keys = {tag_key(t) for t in first}
    return first + [t for t in tags if tag_key(t) not in keys]


def _tag_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(dedupe_tags(as_tags(value)))


@dataclass(frozen=True)
class TagOps:
    """Which batch operations to run; every option off by default. List fields accept a
    comma-separated string or a sequence and are stored as tuples of tags."""

    dedupe: bool = False
    sort: bool = False
    remove: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()
    mode: str = "or"
    trigger: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("remove", "search", "replace", "trigger"):
            object.__setattr__(self, name, _tag_tuple(getattr(self, name)))
        object.__setattr__(self, "mode", check_mode(self.mode))
        if self.replace and not self.search:
            raise UserError("replacement tags were given without search tags; add the tags to search for")
        # Both conflicts would make a second run undo the first, so refuse them up front.
        removed = {tag_key(t) for t in self.remove}
        clash = [t for t in self.replace if tag_key(t) in removed]
        if clash:
            raise UserError(f"{join_tags(clash)!r} is both removed and added by replace; keep it in one of the two")
        triggers = {tag_key(t) for t in self.trigger}
        clash = [t for t in self.search if tag_key(t) in triggers]
        if clash:
            raise UserError(
                f"search tag {join_tags(clash)!r} is also the activation tag, which every caption gets; "
                "search for other tags"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.dedupe or self.sort or self.remove or self.search or self.trigger)


def curate_tags(tags: Sequence[str], ops: TagOps) -> list[str]:
    """Runs the enabled operations in the notebook's order: dedupe, sort, remove, search &
    replace, activation tag. With sorting on, the list is sorted again after search & replace so
    that appended replacements land in order (a second run would otherwise move them)."""
    tags = list(tags)
    if ops.dedupe:
        tags = dedupe_tags(tags)
    if ops.sort:
        tags = sort_tags(tags)
    if ops.remove:
        tags = remove_tags(tags, ops.remove)
    if ops.search:
        tags = search_replace(tags, ops.search, ops.replace, ops.mode)
        if ops.sort:
            tags = sort_tags(tags)
    if ops.trigger:
        tags = set_activation_tag(tags, ops.trigger)
    return tags


def curate(caption: str, ops: TagOps) -> str:
    """``caption`` after ``ops``; idempotent: ``curate(curate(c, ops), ops) == curate(c, ops)``."""
    return join_tags(curate_tags(split_tags(caption), ops))


def tag_counts(captions: Iterable[str]) -> list[tuple[str, int]]:
    """How many captions hold each tag, most common first, then by tag. Spellings that match
    (case, spacing) are counted together under the first one seen."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for caption in captions:
        for tag in dedupe_tags(split_tags(caption)):
            spelling.setdefault(tag_key(tag), tag)
            counts[tag_key(tag)] += 1
    return sorted(((spelling[k], n) for k, n in counts.items()), key=lambda kv: (-kv[1], tag_key(kv[0])))


def typical_prompt(captions: Iterable[str], trigger: str, tags: int = 5) -> str:
    """A prompt that shows what a dataset trains: the trigger, then its most common other tags."""
    common = [tag for tag, _ in tag_counts(captions) if tag_key(tag) != tag_key(trigger)][:tags]
    return join_tags([t for t in (trigger, *common) if t])


# CLIP pre-tokenizes into letter runs, single digits and punctuation, then splits words into BPE
# pieces. Measured against the real tokenizer on tag lists and BLIP sentences: common English words
# are one piece, rarer ones (names, romanised Japanese) about one per 5 letters on average, and
# non-ASCII letters up to one piece per UTF-8 byte. Punctuation is counted per character. Totals
# land between -5% and +25% of the real count, mostly high, which is what a length warning wants.
_PRETOKEN = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_")
_ASCII_LETTERS_PER_TOKEN = 5


def estimate_clip_tokens(text: str) -> int:
    total = 0
    for piece in _PRETOKEN.findall(text):
        if not piece[0].isalpha():
            total += 1
            continue
        ascii_letters = sum(1 for ch in piece if ch.isascii())
        total += math.ceil(ascii_letters / _ASCII_LETTERS_PER_TOKEN)
        total += sum(len(ch.encode("utf-8")) for ch in piece if not ch.isascii())
    return total


@dataclass
class LintReport:
    trigger: tuple[str, ...]
    token_count_exact: bool
    max_tokens: int = MAX_CLIP_TOKENS
    captions: int = 0
    empty: list[str] = field(default_factory=list)
    missing_trigger: list[str] = field(default_factory=list)
    trigger_not_first: list[str] = field(default_factory=list)
    too_long: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.empty or self.missing_trigger or self.trigger_not_first or self.too_long)

    def as_dict(self) -> dict:
        return {
            "captions": self.captions,
            "trigger": list(self.trigger),
            "max_tokens": self.max_tokens,
            "token_count_exact": self.token_count_exact,
            "empty": self.empty,
            "missing_trigger": self.missing_trigger,
            "trigger_not_first": self.trigger_not_first,
            "too_long": [{"name": n, "tokens": c} for n, c in self.too_long],
        }

    def text(self) -> str:
        how = "CLIP tokens" if self.token_count_exact else "CLIP tokens (an estimate: no CLIP tokenizer available)"
        lines = [f"{self.captions} captions checked"]
        if self.empty:
            lines.append(f"empty captions ({len(self.empty)}): {', '.join(self.empty)}")
        if self.missing_trigger:
            lines.append(f"missing the trigger {join_tags(self.trigger)!r} ({len(self.missing_trigger)}): {', '.join(self.missing_trigger)}")
        if self.trigger_not_first:
            lines.append(
                f"trigger not at the start, so tag shuffling moves it ({len(self.trigger_not_first)}): "
                f"{', '.join(self.trigger_not_first)}"
            )
        if self.too_long:
            lines.append(f"longer than {self.max_tokens} {how} ({len(self.too_long)}):")
            lines += [f"  {name}: {count}" for name, count in self.too_long]
        if self.ok:
            lines.append(f"no problems found (lengths counted in {how})")
        return "\n".join(lines)


def lint_captions(
    captions: dict[str, str],
    trigger: str | Sequence[str] = (),
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = MAX_CLIP_TOKENS,
) -> LintReport:
    """Empty captions, captions without the trigger tag(s) or with them not first, and captions
    over ``max_tokens``. An empty caption is reported as empty only, not also as missing the
    trigger. Without ``count_tokens`` the lengths are estimated and the report says so."""
    first = dedupe_tags(as_tags(trigger))
    report = LintReport(tuple(first), token_count_exact=count_tokens is not None, max_tokens=max_tokens)
    counter = count_tokens or estimate_clip_tokens
    want = [tag_key(t) for t in first]
    for name, caption in captions.items():
        report.captions += 1
        keys = [tag_key(t) for t in split_tags(caption)]
        if not keys:
            report.empty.append(name)
            continue
        if want and not set(want) <= set(keys):
            report.missing_trigger.append(name)
        elif want and keys[: len(want)] != want:
            report.trigger_not_first.append(name)
        count = counter(caption)
        if count > max_tokens:
            report.too_long.append((name, count))
    return report

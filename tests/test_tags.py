from __future__ import annotations

import random

import pytest

from lorakit_ext.dataset.tags import (
    TagOps,
    curate,
    dedupe_tags,
    estimate_clip_tokens,
    join_tags,
    lint_captions,
    remove_tags,
    search_replace,
    set_activation_tag,
    sort_tags,
    split_tags,
    tag_counts,
)
from lorakit_ext.errors import UserError


def test_split_and_join_strip_whitespace_and_drop_empty_tags():
    assert split_tags("  1girl ,solo,, ,\tlong hair ,") == ["1girl", "solo", "long hair"]
    assert split_tags("") == []
    assert join_tags(["1girl", "solo", "猫耳"]) == "1girl, solo, 猫耳"
    assert join_tags(split_tags("a,b ,  c")) == "a, b, c"


def test_dedupe_keeps_first_spelling_and_order_ignoring_case_and_spacing():
    tags = ["blue eyes", "solo", "Blue  Eyes", "smile", "solo", "STRASSE", "straße"]
    assert dedupe_tags(tags) == ["blue eyes", "solo", "smile", "STRASSE"]


def test_sort_is_case_insensitive_and_stable():
    assert sort_tags(["b", "B", "a", "C", "Ä"]) == ["a", "b", "B", "C", "Ä"]
    assert sort_tags(["B", "b"]) == ["B", "b"]


def test_remove_drops_every_occurrence_case_insensitively():
    tags = ["1girl", "Solo", "smile", "solo", "long hair"]
    assert remove_tags(tags, "solo, LONG HAIR") == ["1girl", "smile"]
    assert remove_tags(tags, ["solo", "missing"]) == ["1girl", "smile", "long hair"]
    assert remove_tags(tags, "") == tags


def test_search_or_replaces_when_any_searched_tag_is_present():
    tags = ["1girl", "blonde hair", "smile"]
    assert search_replace(tags, "blonde hair, yellow hair", "golden hair") == ["1girl", "smile", "golden hair"]
    assert search_replace(["1girl", "smile"], "blonde hair, yellow hair", "golden hair") == ["1girl", "smile"]


def test_search_and_replaces_only_when_all_searched_tags_are_present():
    both = ["1girl", "hat", "smile", "witch"]
    assert search_replace(both, "hat, witch", "witch hat", mode="and") == ["1girl", "smile", "witch hat"]
    only_one = ["1girl", "hat", "smile"]
    assert search_replace(only_one, "hat, witch", "witch hat", mode="AND") == only_one


def test_search_replace_details():
    tags = ["a", "x", "b"]
    # An empty replacement removes the matches; several replacements append in the order given.
    assert search_replace(tags, "a", "") == ["x", "b"]
    assert search_replace(tags, "a", "r1, r2") == ["x", "b", "r1", "r2"]
    # A replacement already present is not added twice, and one that is also searched stays put.
    assert search_replace(tags, "a", "b, r") == ["x", "b", "r"]
    assert search_replace(tags, "a, b", "a, c", mode="and") == ["a", "x", "c"]
    assert search_replace(tags, "", "r") == tags
    with pytest.raises(UserError, match="xor"):
        search_replace(tags, "a", "b", mode="xor")


def test_activation_tag_moves_or_inserts_first_and_keeps_multi_tag_order():
    assert set_activation_tag(["1girl", "kat"], "kat") == ["kat", "1girl"]
    assert set_activation_tag(["1girl"], "kat") == ["kat", "1girl"]
    tags = ["smile", "Red Hair", "kat", "solo", "kat"]
    assert set_activation_tag(tags, "kat, red hair") == ["kat", "red hair", "smile", "solo"]
    assert set_activation_tag([], ["kat", "red hair"]) == ["kat", "red hair"]


def test_tagops_normalises_and_refuses_settings_a_second_run_would_undo():
    ops = TagOps(remove="a, b ,a", trigger=["kat, red hair"], mode="AND", search="x")
    assert ops.remove == ("a", "b") and ops.trigger == ("kat", "red hair") and ops.mode == "and"
    assert not TagOps().enabled and TagOps(sort=True).enabled
    with pytest.raises(UserError, match="without search"):
        TagOps(replace="x")
    with pytest.raises(UserError, match="both removed and added"):
        TagOps(remove="hat", search="cap", replace="hat")
    with pytest.raises(UserError, match="activation tag"):
        TagOps(search="kat", trigger="kat")
    with pytest.raises(UserError, match="search mode"):
        TagOps(mode="nand")


def test_curate_applies_operations_in_the_notebook_order():
    caption = "smile, Blonde hair, 1girl, smile, watermark, kat"
    ops = TagOps(dedupe=True, sort=True, remove="watermark", search="blonde hair", replace="yellow hair", trigger="kat")
    # dedupe → sort → remove → replace (kept in sorted place) → trigger first
    assert curate(caption, ops) == "kat, 1girl, smile, yellow hair"
    assert curate(caption, TagOps()) == "smile, Blonde hair, 1girl, smile, watermark, kat"


def test_unicode_tags_survive_curation():
    caption = "猫耳, café, Ünïcödé, 猫耳, ÜNÏCÖDÉ"
    assert curate(caption, TagOps(dedupe=True, trigger="ねこ")) == "ねこ, 猫耳, café, Ünïcödé"


VOCAB = ["1girl", "solo", "Solo", "smile", "long  hair", "Long hair", "kat", "red hair", "hat", "witch",
         "猫耳", "café", "CAFÉ", "b", "B", "a", "z"]


def _random_caption(rng: random.Random) -> str:
    tags = [rng.choice(VOCAB) for _ in range(rng.randint(0, 9))]
    return rng.choice([",", ", ", " ,  "]).join(tags)


def _random_subset(rng: random.Random) -> str:
    return ", ".join(rng.sample(VOCAB, rng.randint(0, 3)))


def _random_ops(rng: random.Random) -> TagOps:
    search = _random_subset(rng)
    return TagOps(
        dedupe=rng.random() < 0.5,
        sort=rng.random() < 0.5,
        remove=_random_subset(rng),
        search=search,
        replace=_random_subset(rng) if search else "",
        mode=rng.choice(["or", "and"]),
        trigger=_random_subset(rng),
    )


def test_curate_is_idempotent_for_random_captions_and_operations():
    rng = random.Random(20241124)
    checked = changed = 0
    while checked < 3000:
        try:
            ops = _random_ops(rng)
        except UserError:
            continue
        caption = _random_caption(rng)
        once = curate(caption, ops)
        assert curate(once, ops) == once, (caption, ops)
        checked += 1
        changed += once != join_tags(split_tags(caption))
    # The property means something only if the operations do change most captions.
    assert changed > checked // 2


def test_tag_counts_count_captions_per_tag_most_common_first():
    counts = tag_counts(["kat, smile, smile", "Kat, solo", "kat, b", ""])
    assert counts == [("kat", 3), ("b", 1), ("smile", 1), ("solo", 1)]


def test_lint_reports_empty_missing_trigger_not_first_and_too_long():
    captions = {
        "ok.png": "kat, red hair, smile",
        "empty.png": "  ,  ",
        "missing.png": "red hair, smile",
        "late.png": "smile, kat, red hair",
        "long.png": "kat, red hair, " + ", ".join(f"tag{i}" for i in range(40)),
    }
    report = lint_captions(captions, "kat, red hair", count_tokens=lambda text: len(split_tags(text)) * 2)
    assert report.empty == ["empty.png"]
    assert report.missing_trigger == ["missing.png"]
    assert report.trigger_not_first == ["late.png"]
    assert report.too_long == [("long.png", 84)]
    assert report.token_count_exact and not report.ok
    assert "estimate" not in report.text() and "long.png: 84" in report.text()


def test_lint_without_tokenizer_says_the_count_is_an_estimate():
    report = lint_captions({"a.png": "kat, smile"}, "kat")
    assert report.ok and not report.token_count_exact
    assert "estimate" in report.text()
    long = lint_captions({"a.png": ", ".join(["long hair"] * 40)}, "")
    assert long.too_long and "estimate" in long.text()


def test_estimate_counts_words_digits_and_punctuation():
    assert estimate_clip_tokens("") == 0
    assert estimate_clip_tokens("a photo of a cat") == 5
    assert estimate_clip_tokens("1girl, solo") == 4  # 1 · girl · , · solo
    assert estimate_clip_tokens("猫") >= 1

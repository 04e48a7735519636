"""Several captioners as one: "Both" in the UI (a BLIP sentence followed by WD tags, or two taggers)."""

from __future__ import annotations

from lorakit_ext.dataset.tags import dedupe_tags, join_tags, split_tags


def merge_captions(*captions: str) -> str:
    """The tags of every caption in order, each once (compared as the tag editor compares them)."""
    return join_tags(dedupe_tags([tag for caption in captions for tag in split_tags(caption)]))


class MergedCaptioner:
    """Runs each part on every batch and merges their texts in the order given.

    All parts stay loaded for the whole run: a WD tagger adds a few hundred MB to BLIP, far less
    than reloading either model for every batch would cost.
    """

    def __init__(self, *parts):
        if len(parts) < 2:
            raise ValueError("MergedCaptioner needs at least two captioners")
        self.parts = parts
        self.name = " + ".join(p.name for p in parts)

    def load(self, device, dtype) -> None:
        for part in self.parts:
            part.load(device, dtype)

    def caption(self, images: list) -> list[str]:
        texts = [part.caption(images) for part in self.parts]
        return [merge_captions(*per_image) for per_image in zip(*texts)]

    def unload(self) -> None:
        # Every part gets its unload even when an earlier one raises.
        errors = []
        for part in self.parts:
            try:
                part.unload()
            except Exception as exc:  # noqa: BLE001 - re-raised below once all parts are unloaded
                errors.append(exc)
        if errors:
            raise errors[0]

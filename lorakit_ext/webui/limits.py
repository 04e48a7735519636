"""The allowed range of every number the tab, LoRA Kit's Settings entries and the HTTP API take.

One definition for all three: the tab's sliders and the Settings sliders are built from these, the
API's request fields are bounded by them (pydantic answers 422 before anything is queued), and the
jobs check the values they read from ``config.json`` against them, since ``POST
/sdapi/v1/options`` stores whatever it is sent. Pure: no gradio, no A1111.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit_ext.dataset.images import MAX_MEGAPIXELS
from lorakit_ext.errors import UserError
from lorakit_ext.export.card import PREFERRED_WEIGHT_RANGE


@dataclass(frozen=True)
class Limit:
    minimum: float
    maximum: float
    step: float  # the slider's step; for whole numbers also what a value must be a multiple of
    whole: bool = True

    def slider(self) -> dict:
        """The range arguments of a gradio Slider."""
        return {"minimum": self.minimum, "maximum": self.maximum, "step": self.step}

    def describe(self) -> str:
        if not self.whole:
            return f"a number from {self.minimum:g} to {self.maximum:g}"
        steps = "" if self.step == 1 else f" in steps of {self.step:g}"
        return f"a whole number from {self.minimum:g} to {self.maximum:g}{steps}"

    def check(self, value, what: str):
        """``value`` as an int (whole limits) or float, or :class:`UserError` naming ``what``."""
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        fits = fits and self.minimum <= value <= self.maximum
        if fits and self.whole:
            fits = float(value).is_integer() and value % self.step == 0
        if not fits:
            raise UserError(f"{what} must be {self.describe()}, not {value!r}")
        return int(value) if self.whole else float(value)


# A1111's own txt2img sliders: 1–150 sampling steps, sizes 64–2048 in steps of 8 (latents are /8),
# CFG 1–30.
GRID_STEPS = Limit(1, 150, 1)
GRID_SIZE = Limit(64, 2048, 8)
GRID_CFG = Limit(1, 30, 0.5, whole=False)
# A1111 seeds are unsigned 32-bit; -1 (random) has no place in a grid that compares epochs.
SEED = Limit(0, 2**32 - 1, 1)
# Beyond ±2 a LoRA of ours only shows its artefacts.
LORA_WEIGHT = Limit(-2, 2, 0.05, whole=False)
PREFERRED_WEIGHT = Limit(*PREFERRED_WEIGHT_RANGE, 0.05, whole=False)
IMPORT_MEGAPIXELS = Limit(0.01, MAX_MEGAPIXELS, 0.01, whole=False)

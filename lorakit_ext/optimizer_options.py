"""What each optimiser is built with: the keyword arguments from ``TrainConfig`` and the user's
``optimizer_args`` (kohya sd-scripts' ``key=value`` list), and which package provides it.

Pure (no torch): the config validates the arguments, the trainer builds the optimiser from them
and the kohya TOML export writes the same list, so all three agree.
"""

from __future__ import annotations

import ast

OPTIMIZERS = ("AdamW8bit", "AdamW", "Lion", "Prodigy", "DAdaptAdam", "Adafactor")
# Optimisers that estimate their own step size and expect a learning rate of about 1.0.
ADAPTIVE = ("Prodigy", "DAdaptAdam")
# Below this, an adaptive optimiser's learning rate is surely one meant for Adam.
ADAPTIVE_MIN_LR = 0.1
# Optional optimisers: (module, class, pip package).
PACKAGES = {
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation"),
}


def parse_optimizer_args(text: str) -> dict:
    """``"decouple=True d_coef=2 betas=0.9,0.999"`` → ``{"decouple": True, "d_coef": 2, "betas":
    (0.9, 0.999)}``: space-separated ``key=value`` pairs, values read as Python literals where they
    are one (as sd-scripts reads them), else kept as text. ``ValueError`` names a malformed pair."""
    out = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier() or not value:
            raise ValueError(f"{pair!r} is not key=value (e.g. d_coef=2)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def optimizer_kwargs(config) -> dict:
    """The keyword arguments ``config.optimizer`` gets besides its parameters and learning rate:
    weight decay and Adam's betas from their fields, Adafactor with a fixed learning rate (as
    kohya-colab recommends), then ``optimizer_args`` over them."""
    if config.optimizer == "Adafactor":
        base = {"scale_parameter": False, "relative_step": False, "warmup_init": False, "weight_decay": float(config.weight_decay)}
    else:
        base = {"weight_decay": float(config.weight_decay), "betas": (float(config.adam_beta1), float(config.adam_beta2))}
    return {**base, **parse_optimizer_args(config.optimizer_args)}


def relative_step(config) -> bool:
    """Adafactor in its relative-step mode: it sets its own learning rate, so no scheduler does."""
    return config.optimizer == "Adafactor" and bool(optimizer_kwargs(config).get("relative_step"))


def kohya_args(kwargs: dict) -> list[str]:
    """The ``optimizer_args`` list sd-scripts reads: tuples as ``(a,b)``."""
    def text(value) -> str:
        return "(" + ",".join(map(str, value)) + ")" if isinstance(value, (tuple, list)) else str(value)

    return [f"{key}={text(value)}" for key, value in kwargs.items()]

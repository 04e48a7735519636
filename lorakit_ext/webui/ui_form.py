"""The Train form as data: one :class:`FieldSpec` per ``TrainConfig`` field, and the way back.

Pure (no gradio): ``ui_train`` turns each spec into a component, so a new ``TrainConfig`` field
appears in the tab with its label, help, range and choices without touching the UI code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorakit_ext.errors import UserError
from lorakit_ext.models.families import PRESETS, preset
from lorakit_ext.train_config import TrainConfig

# Integer ranges up to this wide get a slider; wider ones (repeats 1–1000, seed 0–2³²) a number
# box, where a slider could not hit a single value.
SLIDER_MAX_SPAN = 100
# Groups a preset leaves alone: what the user named the LoRA and its trigger are not settings of a
# recipe, and a preset change wiping them would lose typing.
IDENTITY_GROUPS = ("Output",)
# Groups shown open; the rest start folded so the form fits a screen.
OPEN_GROUPS = ("Output", "Dataset", "Steps")
DEFAULT_PRESET = next(iter(PRESETS))


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "checkbox" | "dropdown" | "slider" | "number" | "textbox"
    label: str
    info: str
    group: str
    default: object
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    precision: int | None = None
    choices: tuple[str, ...] = ()
    lines: int = 1  # a textbox's height: several for the fields that take one entry per line

    @property
    def elem_id(self) -> str:
        return f"lorakit_train_{self.name}"


def _range_text(low, high) -> str:
    return f" ({low:g}–{high:g})" if low is not None and high is not None else ""


def field_spec(field: dataclasses.Field) -> FieldSpec:
    meta = field.metadata
    kind_of_value = type(field.default)
    base = dict(name=field.name, label=meta["label"], info=meta["help"], group=meta["group"], default=field.default)
    low, high, step = meta["min"], meta["max"], meta["step"]
    if kind_of_value is bool:
        return FieldSpec(kind="checkbox", **base)
    if meta["choices"]:
        # Dropdowns carry strings (gradio 3 and 4 agree on those); TrainConfig.from_dict turns
        # "225" back into an int.
        return FieldSpec(kind="dropdown", choices=tuple(str(c) for c in meta["choices"]), **base)
    if kind_of_value in (int, float):
        if (
            low is not None
            and high is not None
            and (step is not None or (kind_of_value is int and high - low <= SLIDER_MAX_SPAN))
        ):
            return FieldSpec(kind="slider", minimum=low, maximum=high, step=step or 1, **base)
        # A number box gets no gradio bounds: gradio would reject an out-of-range value with a
        # message naming no field, while TrainConfig.problems() names it in the plan box.
        base["info"] += _range_text(low, high)
        return FieldSpec(kind="number", precision=0 if kind_of_value is int else None, **base)
    return FieldSpec(kind="textbox", lines=meta.get("lines") or 1, **base)


def form_specs(config_cls=TrainConfig) -> list[FieldSpec]:
    return [field_spec(f) for f in config_cls.field_specs()]


def grouped(specs: list[FieldSpec]) -> dict[str, list[FieldSpec]]:
    """Specs by group, groups in the order their first field is declared."""
    out: dict[str, list[FieldSpec]] = {}
    for spec in specs:
        out.setdefault(spec.group, []).append(spec)
    return out


def widget_value(spec: FieldSpec, value):
    """A config value as its component shows it."""
    return str(value) if spec.kind == "dropdown" else value


def config_values(specs: list[FieldSpec], config: TrainConfig) -> list:
    return [widget_value(spec, getattr(config, spec.name)) for spec in specs]


def config_from_values(specs: list[FieldSpec], values) -> TrainConfig:
    """The config the form shows; :class:`UserError` names the field a value does not fit.

    Not validated: the plan box shows ``problems()`` while the user types, Start validates."""
    pairs = list(zip(specs, values, strict=True))
    for spec, value in pairs:
        if value is None or (value == "" and spec.kind == "number"):
            raise UserError(f"{spec.label} is empty; {'enter a number' if spec.kind == 'number' else 'choose a value'}")
    return TrainConfig.from_dict({spec.name: value for spec, value in pairs})


def preset_values(specs: list[FieldSpec], name: str, current) -> list:
    """Every field's value under preset ``name``, keeping the identity fields as they are now."""
    config = preset(name)
    return [
        value if spec.group in IDENTITY_GROUPS else widget_value(spec, getattr(config, spec.name))
        for spec, value in zip(specs, current, strict=True)
    ]

"""Anime tags with SmilingWolf's WD v3 taggers (``wd-vit-tagger-v3``, ``wd-eva02-large-tagger-v3``…)
loaded with ``timm``.

A model folder (or Hugging Face repo) holds timm's ``config.json`` (architecture, ``model_args``,
``pretrained_cfg`` with the input size and normalisation), ``model.safetensors`` and
``selected_tags.csv`` (``tag_id,name,category,count``; one row per output, in output order).
The models were trained on images padded to a square on white and fed as BGR, as the timm
example published with them does; preprocessing here follows that exactly.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lorakit_ext.caption.base import fetch_model, load_local, local_folder, parallel_map
from lorakit_ext.dataset.tags import tag_key
from lorakit_ext.errors import UserError

DEFAULT_WD_MODEL = "SmilingWolf/wd-vit-tagger-v3"
DEFAULT_GENERAL_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
GENERAL, CHARACTER, RATING = 0, 4, 9
CONFIG_FILE, WEIGHTS_FILE, TAGS_FILE = "config.json", "model.safetensors", "selected_tags.csv"
# Two letters in a row mark a word; tags without one ("(o)_(o)", "<|>_<|>", "^_^") are kaomoji.
_WORD = re.compile(r"[^\W\d_]{2}")


@dataclass(frozen=True)
class TagTable:
    names: list[str]
    categories: np.ndarray


def read_tag_table(path: Path) -> TagTable:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise UserError(f"{path} has no name,category columns; is it a WD tagger's {TAGS_FILE}?")
    return TagTable([r["name"] for r in rows], np.array([int(r["category"]) for r in rows], dtype=np.int64))


def tag_text(name: str) -> str:
    """A tag as written in a caption: ``long_hair`` → ``long hair``; kaomoji such as ``^_^`` or
    ``(o)_(o)`` keep their underscores, which are part of the face."""
    return name.replace("_", " ") if len(name) > 3 and _WORD.search(name) else name


def _loose(tag: str) -> str:
    # Blacklist entries match whether the user wrote "long_hair" or "Long Hair".
    return tag_key(tag.replace("_", " "))


def select_tags(
    probs: Sequence[float] | np.ndarray,
    tags: Sequence[str],
    categories: Sequence[int] | np.ndarray,
    general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
    blacklist: Iterable[str] = (),
    include_ratings: bool = False,
) -> list[str]:
    """Caption tags for one image's sigmoid outputs, most confident first.

    General tags above ``general_threshold`` and character tags above ``character_threshold``;
    with ``include_ratings`` also the single most likely rating (the four are exclusive, so
    more than one would contradict itself).
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    cats = np.asarray(categories).reshape(-1)
    if not len(probs) == len(tags) == len(cats):
        raise ValueError(f"{len(probs)} probabilities for {len(tags)} tags and {len(cats)} categories")
    picked = ((cats == GENERAL) & (probs > general_threshold)) | ((cats == CHARACTER) & (probs > character_threshold))
    ratings = np.flatnonzero(cats == RATING)
    if include_ratings and ratings.size:
        picked[ratings[np.argmax(probs[ratings])]] = True
    index = np.flatnonzero(picked)
    order = index[np.argsort(-probs[index], kind="stable")]
    blocked = {_loose(b) for b in blacklist if b.strip()}
    return [tag_text(tags[i]) for i in order if _loose(tags[i]) not in blocked]


def wd_files(source: str) -> dict[str, Path]:
    """The three model files, from a folder or from the hub (cache first)."""
    source = source.removeprefix("hf-hub:")
    folder = local_folder(source)
    names = (CONFIG_FILE, WEIGHTS_FILE, TAGS_FILE)
    if folder is not None:
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(
                f"{folder} lacks {', '.join(missing)}; a WD v3 tagger folder for timm holds {', '.join(names)} "
                "(the ONNX-only folders of other taggers cannot be used)"
            )
        return {n: folder / n for n in names}

    def download(local_only: bool) -> dict[str, Path]:
        from huggingface_hub import hf_hub_download

        return {n: Path(hf_hub_download(source, n, local_files_only=local_only)) for n in names}

    return fetch_model(source, download, what="WD v3 tagger", option="--wd-model")


def build_model(config: dict):
    """The timm network described by a WD ``config.json``, with random weights."""
    from lorakit_ext.models.ldm_import import import_torchvision

    import_torchvision()  # timm imports it; this also works where a CUDA build sits next to CPU torch
    import timm

    return timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], **config.get("model_args", {})
    )


def load_wd(source: str):
    """``(model, pretrained_cfg, TagTable)`` in fp32 on the CPU."""
    from safetensors.torch import load_file

    files = wd_files(source)

    def load(_local_only: bool):
        config = json.loads(files[CONFIG_FILE].read_text(encoding="utf-8"))
        model = build_model(config)
        model.load_state_dict(load_file(str(files[WEIGHTS_FILE])))
        return model, config["pretrained_cfg"], read_tag_table(files[TAGS_FILE])

    model, cfg, table = load_local(files[CONFIG_FILE].parent, load, what="WD tagger", needs=", ".join(files))
    if len(table.names) != model.num_classes:
        raise UserError(f"{files[TAGS_FILE]} lists {len(table.names)} tags but the model has {model.num_classes} outputs")
    return model, cfg, table


def preprocess(images: list, cfg: dict):
    """NCHW BGR float batch: each image centred on a white square, resized to the model's input
    size, normalised with its mean/std."""
    import torch
    from PIL import Image

    _, height, width = cfg["input_size"]
    resample = getattr(Image.Resampling, str(cfg.get("interpolation", "bicubic")).upper(), Image.Resampling.BICUBIC)
    mean = np.asarray(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)
    std = np.asarray(cfg.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)

    def one(image):
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
        pixels = np.asarray(square.resize((width, height), resample), dtype=np.float32) / 255.0
        return (pixels - mean) / std

    tensor = torch.from_numpy(np.stack(parallel_map(one, images))).permute(0, 3, 1, 2)
    return tensor[:, [2, 1, 0]].contiguous()


class WdTagger:
    def __init__(
        self,
        model: str = DEFAULT_WD_MODEL,
        *,
        general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
        character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
        blacklist: Iterable[str] = (),
        include_ratings: bool = False,
    ):
        for label, value in (("threshold", general_threshold), ("character threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{label} must be between 0 and 1, not {value}")
        self.source = str(model)
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.blacklist = [b.strip() for b in blacklist if b.strip()]
        self.include_ratings = include_ratings
        self.name = f"wd:{self.source.removeprefix('hf-hub:')}"
        self._model = self._cfg = self._table = self._device = self._dtype = None

    def load(self, device, dtype) -> None:
        model, cfg, table = load_wd(self.source)
        self.attach(model, cfg, table, device, dtype)

    def attach(self, model, pretrained_cfg: dict, table: TagTable, device, dtype) -> None:
        """Uses an already built network (the loader above, or the benchmark's random-weight one)."""
        self._model = model.to(device=device, dtype=dtype).eval()
        self._cfg, self._table, self._device, self._dtype = pretrained_cfg, table, device, dtype

    def caption(self, images: list) -> list[str]:
        import torch

        if self._model is None:
            raise RuntimeError("WdTagger.caption() called before load()")
        with torch.inference_mode():
            logits = self._model(preprocess(images, self._cfg).to(self._device, self._dtype))
            probs = torch.sigmoid(logits.float()).cpu().numpy()
        return [
            ", ".join(
                select_tags(
                    p,
                    self._table.names,
                    self._table.categories,
                    self.general_threshold,
                    self.character_threshold,
                    self.blacklist,
                    self.include_ratings,
                )
            )
            for p in probs
        ]

    def unload(self) -> None:
        self._model = None

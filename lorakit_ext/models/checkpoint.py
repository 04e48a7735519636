"""Loading an SD1/SD2 checkpoint (.safetensors or .ckpt) into ldm's ``LatentDiffusion``, offline.

The model is the same object A1111 holds as ``shared.sd_model``: same classes, same module names,
in eval mode, with ldm's own ``requires_grad`` flags (the UNet's left on, as in A1111). Which family
the file is, and what that family cannot load, its :mod:`~lorakit_ext.models.families` object says.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .families import detect_family
from .families.base import ModelFamily
from .file_hashes import hashes_in_background

# Old SD1 files predate transformers' ``text_model`` level; SD2-turbo uses sgm's prefix for its one
# text encoder (A1111 maps both). SDXL keeps sgm's prefixes.
_KEY_PREFIX_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
_ONE_SGM_EMBEDDER = ("conditioner.embedders.0.", "cond_stage_model.")
_SECOND_SGM_EMBEDDER = "conditioner.embedders.1."
_TEXT_MODEL = ".transformer.text_model."
# Stored in some checkpoints as floats that no longer round to 0..76; the model's own are exact.
_POSITION_IDS_SUFFIX = "embeddings.position_ids"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: ModelFamily
    v_parameterization: bool
    resolution: int
    sha256: str  # of the whole file: A1111's checkpoint hash, kohya's ss_new_sd_model_hash
    legacy_hash: str  # A1111's old 8-digit model_hash, kohya's ss_sd_model_hash

    @property
    def short_hash(self) -> str:
        """The 10-digit form A1111 shows as "Model hash"."""
        return self.sha256[:10]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, keys in ldm's layout; raises ``UserError`` for unreadable files."""
    raw = _read_file(path)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not contain a state dict; choose a Stable Diffusion checkpoint.")
    return file_layout({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})


def family_of_checkpoint(path: Path | str) -> ModelFamily:
    """The family of a checkpoint file, before loading it: a .safetensors file's header alone gives
    every key and shape (a .ckpt is read whole). ``UserError`` as :func:`load_sd_checkpoint` would."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The checkpoint {path} does not exist; check the path.")
    if path.suffix.lower() != ".safetensors":
        return detect_family(read_state_dict(path), path)
    import safetensors

    try:
        with safetensors.safe_open(str(path), "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as exc:
        raise UserError(f"{path} is damaged or not a checkpoint ({_first_line(exc)}); download it again.") from exc
    return detect_family(file_layout({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}), path)


def _read_file(path: Path):
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise UserError(f"{path} is not a .safetensors or .ckpt file; choose a Stable Diffusion checkpoint.")
    try:
        if suffix == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    # Whatever a parser raises on a bad file (its error types differ by format and version) means
    # the same to the user.
    except Exception as exc:
        # torch's weights-only unpickler names what it refused; the case differs by version
        # ("Unsupported global: …", "Trying to load unsupported GLOBAL … whose module … is blocked").
        if re.search(r"unsupported (global|class)", str(exc), re.IGNORECASE):
            raise UserError(
                f"{path} holds Python objects besides weights, which LoRA Kit does not unpickle; "
                "convert it to .safetensors."
            ) from exc
        raise UserError(f"{path} is damaged or not a checkpoint ({_first_line(exc)}); download it again.") from exc


def _first_line(exc: BaseException) -> str:
    """The error's type and first sentence: enough to tell a truncated file from a foreign one."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].split('. ')[0]}" if lines else type(exc).__name__


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def file_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as A1111 has them: SD1's with CLIP's ``text_model.`` level, an sgm file with one text
    encoder (SD2-turbo) in ldm's, SDXL's as sgm names them."""
    renames = dict(_KEY_PREFIX_RENAMES)
    if not any(k.startswith(_SECOND_SGM_EMBEDDER) for k in state_dict):
        renames[_ONE_SGM_EMBEDDER[0]] = _ONE_SGM_EMBEDDER[1]
    return {_renamed(k, renames): v for k, v in state_dict.items()}


def _model_layout(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Drops CLIP's ``text_model.`` level from the keys when the installed transformers (5.x) has
    no such level in ``CLIPTextModel``."""
    if any(_TEXT_MODEL in k for k in model.state_dict()):
        return state_dict
    return {k.replace(_TEXT_MODEL, ".transformer.", 1): v for k, v in state_dict.items()}


def _config_for(path: Path, config: Path | None, family: ModelFamily, state_dict) -> tuple[dict, bool]:
    """(config, whether it came from a file); a missing file named by the caller is an error."""
    yaml_path = config if config is not None else path.with_suffix(".yaml")
    if config is not None and not config.is_file():
        raise UserError(f"The model config {config} does not exist; give an existing .yaml file or none.")
    if yaml_path.is_file():
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True), True
        except Exception as exc:
            raise UserError(
                f"The model config {yaml_path} is not valid YAML ({_first_line(exc)}); fix or remove it."
            ) from exc
    return family.model_config(state_dict), False


def _load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, family: ModelFamily,
                  dtype: torch.dtype, device: torch.device) -> None:
    """Puts the file's tensors into ``model`` as its parameters, on ``device`` in ``dtype``, without
    ever writing the model's own uninitialised fp32 storage: peak memory is about the file's size."""
    own = model.state_dict()
    # Top-level buffers (the noise schedule) are computed from the config; so are the family's
    # derived keys; position ids see above.
    derived = {k for k in own if "." not in k or k.startswith(family.derived_keys) or k.endswith(_POSITION_IDS_SUFFIX)}
    missing = [k for k in own if k not in state_dict and k not in derived]
    if missing:
        raise UserError(
            f"{path.name} lacks {len(missing)} of the {family.label} model's weights (first: {missing[0]}); "
            "the file is incomplete or its .yaml config describes another model."
        )
    usable = {k: v for k, v in state_dict.items() if k in own and k not in derived}
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{path.name} does not match its model config: {len(wrong)} weights have other sizes "
            f"(first: {k} is {tuple(state_dict[k].shape)}, expected {tuple(own[k].shape)}); "
            "fix or remove the .yaml beside it."
        )
    del own
    # Moved first, then cast: a blocking copy to a GPU that changes the dtype casts on the CPU
    # (fp16 → bf16 of SD1.5 took 5 s on two cores), the GPU casts in milliseconds.
    converted = {k: v.to(device).to(dtype if v.is_floating_point() else _dtype_of(model, k)) for k, v in usable.items()}
    with torch.no_grad():
        model.load_state_dict(converted, strict=False, assign=True)


def _dtype_of(model: torch.nn.Module, key: str) -> torch.dtype:
    module_path, _, name = key.rpartition(".")
    return getattr(model.get_submodule(module_path), name).dtype


def load_sd_checkpoint(
    path: Path | str,
    config: Path | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    hashes: Future | None = None,
    phases: dict[str, float] | None = None,
):
    """Loads a checkpoint as its family's model (ldm's ``LatentDiffusion``, sgm's ``DiffusionEngine``);
    returns ``(model, ModelInfo)``.

    The config is ``config``, else the .yaml beside the checkpoint with the same name, else the
    family's, detected from the keys (SD2's ε or v by A1111's test forward pass). Nothing is downloaded.
    ``hashes``: the file's :func:`~lorakit_ext.models.file_hashes.hashes_in_background` if the caller
    started it earlier; else it starts here, beside the loading. ``phases``: where given, gets the
    seconds of each part (read_checkpoint, build_model, weights_to_device, wait_for_hashes).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The checkpoint {path} does not exist; check the path.")
    hashes = hashes or hashes_in_background(path)
    timer = _PhaseTimer(phases)
    state_dict = read_state_dict(path)
    family = detect_family(state_dict, path)
    cfg, from_file = _config_for(path, Path(config) if config is not None else None, family, state_dict)
    if not from_file:
        family.check_standard_widths(state_dict, path)
    timer.done("read_checkpoint")
    model = family.build(cfg)
    timer.done("build_model")
    _load_weights(model, _model_layout(state_dict, model), path, family, dtype, torch.device(device))
    del state_dict
    family.settle_prediction(model, from_file)
    place_model(model, device, dtype)
    timer.done("weights_to_device")
    sha256, legacy = hashes.result()
    timer.done("wait_for_hashes")
    v = model.parameterization == "v"
    info = ModelInfo(path, family, v, family.resolution(v), sha256, legacy)
    return model, info


class _PhaseTimer:
    """Writes the seconds since the last mark into ``phases`` under each name (nothing where None)."""

    def __init__(self, phases: dict[str, float] | None):
        self.phases = phases
        self.mark = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        if self.phases is not None:
            self.phases[name] = round(now - self.mark, 3)
        self.mark = now


def place_model(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Moves the model to ``device`` and its networks to ``dtype``; the noise schedule stays fp32, as A1111 keeps it."""
    for name in ("model", "first_stage_model", "cond_stage_model", "conditioner"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(dtype=dtype)
    model.to(device=device)
    # ldm's and sgm's text encoders move token ids to this attribute, which defaults to "cuda".
    for module in model.modules():
        if isinstance(vars(module).get("device"), (str, torch.device)):
            module.device = torch.device(device)

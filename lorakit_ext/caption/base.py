"""The captioner interface, the device/precision rules and the model-fetching rule captioners share."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from lorakit_ext.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

T = TypeVar("T")
R = TypeVar("R")
DTYPES = ("auto", "fp32", "fp16", "bf16")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUE = ("1", "true", "yes", "on")
# Threads that prepare a batch; beyond this the GPU, not the CPU, is what the batch waits for.
_WORKERS = min(8, os.cpu_count() or 1)
# Characters of the library's own error kept in the message: enough to tell "no network" from "no such repo".
_DETAIL = 240


class Captioner(Protocol):
    """What the runner needs from a caption model.

    ``load`` puts the weights on ``device`` in ``dtype`` (a captioner that manages its own device,
    like A1111's interrogators, may ignore both); ``caption`` returns one text per image, in order
    (a comma-separated tag list or one sentence; "" when it found nothing); ``unload`` frees the
    weights and must be safe to call when ``load`` failed or never ran.
    """

    name: str

    def load(self, device: torch.device, dtype: torch.dtype) -> None: ...

    def caption(self, images: list[Image.Image]) -> list[str]: ...

    def unload(self) -> None: ...


def parallel_map(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on a few threads. PIL decodes, pastes and resizes with the GIL
    released, and resizing photos to the model's input size costs more CPU time per image than
    the model's GPU time, so preparing a batch on one core would leave the GPU waiting."""
    if len(items) < 2 or _WORKERS < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(len(items), _WORKERS)) as pool:
        return list(pool.map(fn, items))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": the first CUDA GPU when torch sees one, else the CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """"auto" is fp16 on a GPU (half the memory, no quality loss for inference) and fp32 on the CPU,
    where half precision is slow or unsupported."""
    import torch

    name = "auto" if name is None else str(name).lower()
    if name not in DTYPES:
        raise UserError(f"unknown precision {name!r}; one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def local_folder(source: str) -> Path | None:
    """``source`` as an existing folder, or None when it names a Hugging Face model instead."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if _HUB_ID.match(source):
        return None
    raise UserError(f"{source!r} is neither a folder nor a Hugging Face model id (owner/name)")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch_model(model_id: str, load: Callable[[bool], T], *, what: str, option: str) -> T:
    """``load(local_files_only)`` from the Hugging Face cache, else from the hub.

    The cache is tried first so a machine that already has the model never touches the network,
    and an offline machine (``HF_HUB_OFFLINE``) gets the message at once instead of after the
    hub client's retries. Every failure becomes one :class:`UserError` that says how to place the
    model by hand; ``option`` is the command-line option that takes its folder.
    """
    try:
        return load(True)
    except Exception as exc:  # noqa: BLE001 - any failure here only means "not usable from the cache"
        error = exc
    if not hub_offline():
        try:
            # One plain request first: the download clients retry an unreachable hub for ~25 s
            # per file, this answers at once (and names a missing or private repo).
            from huggingface_hub import HfApi

            HfApi().model_info(model_id, timeout=15)
            return load(False)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end in the same advice
            error = exc
    where = "this machine is offline (HF_HUB_OFFLINE is set)" if hub_offline() else "downloading it failed"
    name = model_id.rsplit("/", 1)[-1]
    detail = " ".join(str(error).split()) or "no details"
    detail = detail if len(detail) <= _DETAIL else detail[: _DETAIL - 1] + "…"
    raise UserError(
        f"cannot load the {what} {model_id!r}: it is not in the Hugging Face cache and {where} "
        f"({type(error).__name__}: {detail}). On a machine with network access run "
        f"`huggingface-cli download {model_id} --local-dir {name}` (`hf download` in newer huggingface_hub), "
        f"copy the folder here and pass {option} /path/to/{name}"
    ) from error


def load_local(folder: Path, load: Callable[[bool], T], *, what: str, needs: str) -> T:
    """``load(True)`` on a model folder, with a message naming the files it should hold."""
    try:
        return load(True)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises, the folder is the problem
        raise UserError(f"{folder} is not a usable {what} folder (it needs {needs}): {exc}") from exc

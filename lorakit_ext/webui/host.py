"""Where things live in the running WebUI, and which server paths LoRA Kit may touch."""

from __future__ import annotations

import sys
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.project import confine
from lorakit_ext.webui.settings import setting


class FeatureMissing(UserError):
    """A part LoRA Kit needs is not installed in this WebUI."""


class PathAccessDenied(UserError):
    """A server path outside the folders LoRA Kit may use while extension access is disabled."""


def _cmd_opts():
    from modules import shared

    return shared.cmd_opts


def lora_root() -> Path:
    """A1111's Lora folder (``--lora-dir``, default ``models/Lora``)."""
    configured = getattr(_cmd_opts(), "lora_dir", None)
    if configured:
        return Path(configured).resolve()
    # The built-in Lora extension adds --lora-dir; with it disabled the folder keeps its default.
    from modules import paths

    return (Path(paths.models_path) / "Lora").resolve()


def lora_dir() -> Path:
    """Where epoch files go: the Lora folder, or the sub-folder set in Settings, created if missing."""
    root = lora_root()
    sub = str(setting("lorakit_lora_subfolder") or "").strip()
    folder = root
    if sub:
        if Path(sub).is_absolute():
            raise UserError(f"the Lora sub-folder setting {sub!r} is an absolute path; give a folder name inside {root}")
        folder = confine(root / sub, root)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def projects_root() -> Path:
    """The projects folder from Settings, default ``<WebUI data folder>/lorakit``."""
    configured = str(setting("lorakit_projects_root") or "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    from modules import paths_internal

    return (Path(paths_internal.data_path) / "lorakit").resolve()


def extension_access_disabled() -> bool:
    return bool(getattr(_cmd_opts(), "disable_extension_access", False))


def check_path_access(path: Path | str, purpose: str) -> Path:
    """``path`` resolved, or :class:`PathAccessDenied` when A1111 runs with extension access
    disabled (listening beyond localhost without ``--enable-insecure-extension-access``) and the
    path lies outside the projects folder and the Lora folder. ``purpose`` completes the sentence
    "refusing to …", e.g. "import images from"."""
    expanded = Path(path).expanduser()
    if not extension_access_disabled():
        return expanded.resolve()
    allowed = (projects_root(), lora_root())
    try:
        # The path as given, not resolved: confine must see the links on its way to refuse them.
        return confine(expanded, *allowed)
    except UserError:
        raise PathAccessDenied(
            f"refusing to {purpose} {path}: A1111 disabled extension access (it was started with --listen, "
            f"--share, --ngrok or --server-name), so LoRA Kit only uses server folders inside {allowed[0]} and "
            f"{allowed[1]}; upload the files instead, or start A1111 with --enable-insecure-extension-access"
        ) from None


def networks_module():
    """The built-in Lora extension's ``networks`` module, as A1111 loaded it.

    Looked up in ``sys.modules`` rather than imported: the name is only importable while A1111
    loads that extension's scripts, and importing it fresh would build a second, empty registry.
    """
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "load_network"):
        raise UserError(
            "A1111's built-in Lora extension is not loaded (Extensions tab: enable 'Lora'); "
            "LoRA Kit needs it to list and check the files it writes"
        )
    return networks


def refresh_loras() -> None:
    """Re-reads the Lora folder so new epoch files show up in Extra Networks and ``<lora:…>``."""
    networks_module().list_available_networks()


def model_in_memory():
    """The checkpoint A1111 holds now, or None. Reads ``sd_models.model_data.sd_model``:
    ``shared.sd_model`` would load one when none is loaded, which a page load must not do."""
    from modules import sd_models

    return sd_models.model_data.sd_model

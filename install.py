"""Run by A1111 before it starts (cwd: the WebUI folder, the WebUI's Python): installs what LoRA Kit
needs and the WebUI lacks, without touching the WebUI's own packages.

Only ``peft`` and ``imagehash`` can be missing; everything else LoRA Kit uses ships with A1111.
pip gets a constraints file pinning the installed versions of the host's core packages, so a
dependency can never upgrade or replace torch, transformers, gradio, numpy or Pillow: if one
would have to change, pip fails instead and the WebUI keeps working (LoRA Kit then says what is
missing when training starts).

The optional optimisers (bitsandbytes for AdamW8bit, lion-pytorch, prodigyopt, dadaptation) are
installed only when the WebUI starts with ``LORAKIT_INSTALL_OPTIMIZERS=1`` (e.g. in
``webui-user.sh``/``.bat``), under the same constraints; a run that asks for a missing one is
refused with the command that installs it.

peft must also *import* with the host's transformers and accelerate, which its declared
requirements do not guarantee: on A1111 v1.10.1's pins (transformers 4.30.2, accelerate 0.21.0)
peft 0.14 fails on ``from transformers import Cache`` and 0.15+ on accelerate's missing
``clear_device_cache``, while 0.13.2 works. On older hosts the range below 0.14 is chosen at once;
otherwise the newest peft is tried, checked by importing it, and replaced by the old range if
that import fails.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

PROTECTED = ("torch", "torchvision", "transformers", "tokenizers", "accelerate", "safetensors",
             "huggingface_hub", "gradio", "numpy", "Pillow", "pydantic")
OLD_HOST_PEFT = "peft>=0.11,<0.14"
NEW_HOST_PEFT = "peft>=0.11"
IMAGEHASH = "imagehash>=4.3"
# Below either version the newest peft is known not to import (see the module docstring).
NEW_HOST = {"transformers": (4, 38), "accelerate": (0, 26)}
PEFT_IMPORT_CHECK = "import peft; from peft import LoraConfig, inject_adapter_in_model"
INSTALL_OPTIMIZERS_ENV = "LORAKIT_INSTALL_OPTIMIZERS"
# pip package → the module it provides.
OPTIMIZERS = {"bitsandbytes": "bitsandbytes", "lion-pytorch": "lion_pytorch", "prodigyopt": "prodigyopt", "dadaptation": "dadaptation"}


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: ``"4.30.2"`` → (4, 30, 2), ``"2.1.2+cu121"`` → (2, 1, 2)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def old_host(versions: dict[str, str | None]) -> bool:
    return any(versions.get(name) and release(versions[name]) < minimum for name, minimum in NEW_HOST.items())


def peft_requirement(versions: dict[str, str | None]) -> str:
    return OLD_HOST_PEFT if old_host(versions) else NEW_HOST_PEFT


def peft_fits(peft_version: str | None, versions: dict[str, str | None]) -> bool:
    """Whether an installed peft can stay: present and, on an old host, below 0.14."""
    if peft_version is None:
        return False
    return not old_host(versions) or release(peft_version) < (0, 14)


def constraints(versions: dict[str, str | None]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in versions.items() if version)


def _pip_install(requirement: str, constraints_path: str) -> None:
    import launch

    # Double quotes work in both shells run_pip may use (sh and cmd.exe); the specifiers hold < and >.
    launch.run_pip(f'install "{requirement}" -c "{constraints_path}"', f"{requirement} for LoRA Kit")


def _peft_imports() -> bool:
    return subprocess.run([sys.executable, "-c", PEFT_IMPORT_CHECK], capture_output=True).returncode == 0


def main() -> None:
    import launch

    versions = {name: installed(name) for name in PROTECTED}
    wanted = []
    if not peft_fits(installed("peft"), versions):
        wanted.append(peft_requirement(versions))
    if not launch.is_installed("imagehash"):
        wanted.append(IMAGEHASH)
    if os.environ.get(INSTALL_OPTIMIZERS_ENV, "").strip() not in ("", "0"):
        wanted += [package for package, module in OPTIMIZERS.items() if not launch.is_installed(module)]
    if not wanted:
        return
    fd, path = tempfile.mkstemp(prefix="lorakit-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(constraints(versions))
        for requirement in wanted:
            _pip_install(requirement, path)
        if NEW_HOST_PEFT in wanted and not _peft_imports():
            print(f"LoRA Kit: the newest peft does not import with this WebUI's packages; installing {OLD_HOST_PEFT}")
            _pip_install(OLD_HOST_PEFT, path)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()

"""Reading torch's GPU libraries into the page cache while a headless run imports.

The first training step is the process's first use of cuBLAS, cuDNN and torch's own CUDA kernels.
The loader maps those libraries (several GB) but reads them only page by page as each kernel
loads, so on a machine that has just started, or whose page cache has let them go, the first step
waits on one disk read after another. Read in order on a daemon thread while Python imports the
training stack (seconds bound by the CPU), the same files are in the page cache when the step
needs them. Torch-free: it starts before torch is imported.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from lorakit_ext.models.file_hashes import chunks


def _is_library(path: Path) -> bool:
    name = path.name
    return (name.endswith((".so", ".dll")) or ".so." in name) and path.is_file()


def _package_dirs(name: str) -> list[Path]:
    """Where an installed (possibly namespace) package lies, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def gpu_library_files() -> list[Path]:
    """The shared libraries of the nvidia-* wheels torch loads (cuBLAS, cuDNN, …) and of torch's own
    ``lib`` folder, that first; nothing for a CPU build of torch without those wheels."""
    nvidia = [p for root in _package_dirs("nvidia") for p in sorted(root.glob("**/lib/*")) if _is_library(p)]
    torch_libs = [p for root in _package_dirs("torch") for p in sorted((root / "lib").glob("*")) if _is_library(p)]
    gpu_build = nvidia or any("cuda" in p.name or "hip" in p.name for p in torch_libs)
    return nvidia + torch_libs if gpu_build else []


def read_files(files: list[Path]) -> int:
    """Reads each file to its end (an unreadable one is skipped); returns the bytes read."""
    total = 0
    for path in files:
        try:
            with open(path, "rb", buffering=0) as fh:
                total += sum(len(chunk) for chunk in chunks(fh))
        except OSError:
            continue
    return total


def read_gpu_libraries_in_background() -> threading.Thread:
    """Starts reading :func:`gpu_library_files` on a daemon thread (a run that ends early does not
    wait for it) and returns the thread."""
    thread = threading.Thread(target=lambda: read_files(gpu_library_files()), name="lorakit-warm-libraries", daemon=True)
    thread.start()
    return thread

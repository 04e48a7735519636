"""A headless run reads torch's GPU libraries into the page cache while it imports (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit_ext.cli import library_warmup


def _library(path, size=10):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF" + b"\0" * (size - 4))
    return path


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fake site-packages: nvidia wheels in the CUDA 12 and CUDA 13 layouts, and torch's lib folder."""
    nvidia, torch_dir = tmp_path / "nvidia", tmp_path / "torch"
    monkeypatch.setattr(library_warmup, "_package_dirs", lambda name: {"nvidia": [nvidia], "torch": [torch_dir]}[name])
    return nvidia, torch_dir


def test_nvidia_libraries_come_first_then_torchs_and_nothing_else(site):
    nvidia, torch_dir = site
    cublas = _library(nvidia / "cublas" / "lib" / "libcublasLt.so.12")
    cudnn = _library(nvidia / "cu13" / "lib" / "libcudnn.so.9")
    (nvidia / "cublas" / "include").mkdir()
    (nvidia / "cublas" / "include" / "cublas.h").write_text("header")
    torch_cuda = _library(torch_dir / "lib" / "libtorch_cuda.so")
    c10 = _library(torch_dir / "lib" / "libc10.so")
    _library(torch_dir / "lib" / "libshm" / "x.so")  # a folder's contents, not torch/lib's own libraries
    (torch_dir / "lib" / "README.txt").write_text("not a library")
    files = library_warmup.gpu_library_files()
    assert files[:2] == sorted([cublas, cudnn]) and files[2:] == [c10, torch_cuda]


def test_a_cpu_build_of_torch_has_nothing_to_read(site):
    _, torch_dir = site
    _library(torch_dir / "lib" / "libtorch_cpu.so")
    _library(torch_dir / "lib" / "libc10.so")
    assert library_warmup.gpu_library_files() == []


def test_windows_builds_bundle_their_cuda_libraries_in_torch_lib(site):
    _, torch_dir = site
    dlls = [_library(torch_dir / "lib" / name) for name in ("cublas64_12.dll", "torch_cuda.dll")]
    assert library_warmup.gpu_library_files() == dlls


def test_reading_covers_every_byte_and_skips_what_it_cannot_open(tmp_path):
    big = _library(tmp_path / "big.so", size=3 * (1 << 23) + 5)  # three whole 8 MiB reads and a part
    small = _library(tmp_path / "small.so", size=7)
    assert library_warmup.read_files([big, tmp_path / "gone.so", tmp_path, small]) == big.stat().st_size + 7


# Runs ``python -m lorakit_ext`` with the warm-up replaced by a probe that notes whether torch was
# already imported when the run started it; prints the exit status and the notes as JSON.
PROBE = """
import json, runpy, sys
from lorakit_ext.cli import library_warmup
calls = []
library_warmup.read_gpu_libraries_in_background = lambda: calls.append("torch" in sys.modules)
sys.argv = ["lorakit_ext", *sys.argv[1:]]
try:
    runpy.run_module("lorakit_ext", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    print(json.dumps({"exit": exc.code, "calls": calls}))
"""


@pytest.mark.parametrize("device, calls", [([], [False]), (["--device", "cpu"], [])])
def test_the_train_command_starts_reading_before_it_imports_torch_unless_on_the_cpu(tmp_path, device, calls):
    # A project that does not exist: the run stops with its error after the warm-up has started.
    argv = ["train", "nobody", "--root", str(tmp_path), "--base-model", str(tmp_path / "x.safetensors"), *device]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert json.loads(proc.stdout.splitlines()[-1]) == {"exit": 2, "calls": calls}, proc.stderr

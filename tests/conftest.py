"""Shared test setup: no network, and one tiny SD1.5 and one tiny SD2 model per test session."""

from __future__ import annotations

import os

# Before anything imports transformers or huggingface_hub: a test that tries to download fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread: tiny models gain nothing from intra-op threads (on a busy CPU they
    wait on each other), and threaded CPU reductions may round differently from run to run, so
    results that must repeat bit for bit need one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """Folder holding ``tiny-sd15.safetensors``, ``tiny-sd15.yaml`` and ``clip/``, built once."""
    from lorakit_ext.models.tiny import build_tiny_sd15

    folder = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_sd15(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """``(checkpoint, yaml)`` of a tiny SD2-layout v-model, built once (``tests/tiny_sd2.py``)."""
    from tiny_sd2 import build_tiny_sd2

    path = build_tiny_sd2(tmp_path_factory.mktemp("tiny-sd2"))
    return path, path.with_suffix(".yaml")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """sgm's ``DiffusionEngine`` at tiny widths (``tests/tiny_sdxl.py``), built once; skips without
    ``LORAKIT_SGM_DIR``. Shared: tests that change it work on a copy."""
    from tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture
def tiny_sd15(tiny_sd15_dir):
    """``(model, ModelInfo)``: a fresh fp32 CPU ``LatentDiffusion`` per test, free to modify."""
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.tiny import TINY_NAME

    return load_sd_checkpoint(tiny_sd15_dir / f"{TINY_NAME}.safetensors", device="cpu", dtype=torch.float32)

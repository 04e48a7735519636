"""Whether the VAE's activations fit beside the resident UNet: free memory plus torch's unused cache."""

from __future__ import annotations

import torch

from lorakit_ext.train import gpu_memory

GIB = 2**30


def test_room_counts_free_memory_and_the_unused_cache_on_the_current_gpu(monkeypatch):
    asked = []

    def figure(value):
        return lambda index: asked.append(index) or value

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", figure((1 * GIB, 80 * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", figure(3 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", figure(2 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", figure(1.0))
    assert gpu_memory.has_room(torch.device("cuda"), 2 * GIB)
    assert not gpu_memory.has_room(torch.device("cuda"), 2 * GIB + 1)
    assert set(asked) == {3}, "a device without an index means the current one, passed as an index"
    assert gpu_memory.has_room(torch.device("cuda", 1), GIB) and asked[-1] == 1


def test_room_stays_within_the_process_memory_fraction(monkeypatch):
    # bench --memory-budget-gib emulates a smaller card with the fraction: the free memory the
    # driver reports is the whole GPU's.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 7 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 6.5 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 8 / 80)
    assert gpu_memory.has_room(torch.device("cuda", 0), 1.5 * GIB)
    assert not gpu_memory.has_room(torch.device("cuda", 0), 1.5 * GIB + 1)


def test_the_cpu_always_has_room():
    assert gpu_memory.has_room(torch.device("cpu"), 10**15)


def test_headless_runs_grow_segments_in_place_unless_the_user_set_the_allocator(monkeypatch):
    settings = []
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings", raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append, raising=False)
    for name in gpu_memory.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert gpu_memory.grow_segments_in_place(torch.device("cuda:0"))
    assert settings == ["expandable_segments:True"]
    assert not gpu_memory.grow_segments_in_place(torch.device("cpu"))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert not gpu_memory.grow_segments_in_place(torch.device("cuda:0"))
    assert settings == ["expandable_segments:True"], "the user's own allocator settings stand"


def test_a_platform_without_expandable_segments_keeps_the_default(monkeypatch):
    def refuse(_):
        raise RuntimeError("expandable_segments not supported on this platform")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse, raising=False)
    for name in gpu_memory.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert not gpu_memory.grow_segments_in_place(torch.device("cuda"))


def test_the_setter_of_newer_torch_comes_first(monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: calls.append(("accelerator", s)), raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(("cuda", s)), raising=False)
    for name in gpu_memory.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert gpu_memory.grow_segments_in_place(torch.device("cuda"))
    assert calls == [("accelerator", "expandable_segments:True")]

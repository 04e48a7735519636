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

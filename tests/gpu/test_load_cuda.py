"""Loading a checkpoint straight onto a GPU: the file's tensors cross to the device before they
change dtype, the rest of the model follows, and SD2's no-yaml v-test runs there. Needs a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.models.checkpoint import _model_layout, load_sd_checkpoint, read_state_dict
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.models.tiny import TINY_NAME

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_checkpoint_loads_onto_the_gpu_in_the_asked_dtype_with_the_files_values(tiny_sd15_dir):
    path = tiny_sd15_dir / f"{TINY_NAME}.safetensors"
    phases: dict[str, float] = {}
    model, _ = load_sd_checkpoint(path, device="cuda", dtype=torch.bfloat16, phases=phases)
    assert list(phases) == ["read_checkpoint", "build_model", "weights_to_device", "wait_for_hashes"]
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cuda"}
    own = model.state_dict()
    for key, value in _model_layout(read_state_dict(path), model).items():
        if key in own and value.is_floating_point() and "." in key:
            assert own[key].dtype == torch.bfloat16, key
            assert torch.equal(own[key].cpu(), value.to(torch.bfloat16)), key
    # The noise schedule stays fp32, as A1111 keeps it.
    assert model.alphas_cumprod.dtype == torch.float32


def test_sd2_without_yaml_tells_v_on_the_gpu(tiny_sd2, tmp_path, monkeypatch):
    from tiny_sd2 import TINY_SD2_WIDTHS, tiny_sd2_config

    tensors = read_state_dict(tiny_sd2[0])
    tensors["model.diffusion_model.out.2.weight"].zero_()
    tensors["model.diffusion_model.out.2.bias"].fill_(-3.0)
    bare = tmp_path / "bare-sd2.safetensors"
    atomic_write_bytes(bare, save(tensors))
    monkeypatch.setattr(SD2, "model_config", lambda state_dict: tiny_sd2_config(v=False))
    monkeypatch.setattr(SD2, "widths", TINY_SD2_WIDTHS)
    model, info = load_sd_checkpoint(bare, device="cuda", dtype=torch.float16)
    assert info.v_parameterization and model.parameterization == "v"
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cuda"}

"""LoHa and LoKr inside a real A1111, in-process (``LORAKIT_A1111_DIR``; see conftest.py): a run of
each on the loaded model, through the Train button's path, writes epoch files that A1111's own Lora
loader reads with every key matched (the post-save check of each epoch, and once more here) into
its own LoHa and LoKr modules, whose deltas are the ones LoRA Kit's merge computes, and that change
the image.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

PROMPT = "a photo of a cat"
TINY = {"resolution": 64, "enable_bucket": False, "train_batch_size": 2, "num_repeats": 1, "max_train_epochs": 2,
        "network_dim": 4, "network_alpha": 4, "conv_dim": 2, "conv_alpha": 1, "optimizer": "AdamW",
        "lr_scheduler": "constant", "unet_lr": 1e-2, "mixed_precision": "no"}
A1111_MODULE = {"LoHa": "NetworkModuleHada", "LoKr": "NetworkModuleLokr"}


@pytest.mark.parametrize("network_type", list(A1111_MODULE))
def test_a1111_loads_every_module_of_a_lycoris_epoch_as_lora_kit_merges_it(webui, network_type):
    from modules.call_queue import wrap_gradio_gpu_call

    from lorakit_ext.export.apply import module_delta, target_weight
    from lorakit_ext.export.writer import read_lora_file
    from lorakit_ext.models.families.sd1 import SD1
    from lorakit_ext.project import create_project
    from lorakit_ext.webui import bridge, host, jobs

    shared, name = webui.shared, f"lk{network_type.lower()}{int(time.time())}"
    project = create_project(host.projects_root(), name)
    for i in range(4):
        webui.txt2img(f"{PROMPT} {i}", seed=20 + i).save(project.dataset / f"cat{i}.png")
        (project.dataset / f"cat{i}.txt").write_text(f"lkt0k, cat {i}")
    auto_grid = shared.opts.data.get("lorakit_auto_grid", True)
    shared.opts.data["lorakit_auto_grid"] = False
    try:
        handler = wrap_gradio_gpu_call(jobs.train_in_gradio, extra_outputs=[[], [], None])
        _, files, _, status = handler(f"task({name})", name, json.dumps({**TINY, "network_type": network_type}))
    finally:
        shared.opts.data["lorakit_auto_grid"] = auto_grid
    assert "Finished" in status and len(files) == 2, status
    path = Path(files[-1])
    tensors, metadata = read_lora_file(path)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        parts.setdefault(module, {})[part] = tensor
    assert bridge.check_lora_file(path) == len(parts)

    # A1111's own loader (networks.py, and the network.py it imports), as the post-save check uses it.
    on_disk = sys.modules["network"].NetworkOnDisk(path.stem, str(path))
    net = host.networks_module().load_network(path.stem, on_disk)
    assert {type(module).__name__ for module in net.modules.values()} == {A1111_MODULE[network_type]}
    assert len(net.modules) == len(parts)
    roots = SD1.component_roots(shared.sd_model)
    worst = 0.0
    with torch.no_grad():
        for module in net.modules.values():
            kohya_name = module.network_key.partition(".")[0]
            component, module_path = SD1.module_path_from_kohya(kohya_name)
            weight, rows = target_weight(roots[component], module_path)
            orig = weight[rows] if rows is not None else weight
            # A1111 computes in the file's fp16, whose subnormals blur deltas as small as a few steps
            # make; LoRA Kit's merge computes in fp32. The formulas are compared in fp32.
            for attribute, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
                    setattr(module, attribute, value.float())
            theirs = module.calc_updown(orig)[0]
            ours = module_delta(parts[kohya_name], orig.shape, 1.0)
            worst = max(worst, float((theirs - ours).abs().max() / ours.abs().max()))
    assert worst < 1e-5, worst

    bridge.unmerge_networks(shared.sd_model)
    image = webui.txt2img(PROMPT, seed=3)
    assert webui.txt2img(f"{PROMPT} <lora:{path.stem}:1>", seed=3).tobytes() != image.tobytes()
    bridge.unmerge_networks(shared.sd_model)
    assert webui.txt2img(PROMPT, seed=3).tobytes() == image.tobytes()

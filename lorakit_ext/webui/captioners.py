"""A1111's own interrogators as LoRA Kit captioners, and A1111's model off the GPU while any runs.

``modules.interrogate``'s ``interrogate()`` and ``modules.deepbooru``'s ``tag()`` would each begin
and end ``shared.state`` and load/unload per image, so they are not used: the captioners below
call the load, caption and unload steps those functions are made of, and the job running them
keeps A1111's progress bar. Checked against v1.6.0–v1.10.1, where every name used here exists.
"""

from __future__ import annotations

import contextlib

from lorakit_ext.caption.runner import caption_project


class A1111Blip:
    """``shared.interrogator``'s BLIP (base, capfilt-large weights from ``models/BLIP``). Beams and
    length come from A1111's settings (Interrogate: num beams, min/max length)."""

    name = "a1111-blip"

    def load(self, device, dtype) -> None:
        # A1111 places its interrogators itself (--use-cpu interrogate, --no-half), so device and
        # dtype are ignored. Its load() would bring CLIP ViT-L too, which only interrogate() needs:
        # these are the BLIP half of it.
        from modules import devices, shared

        interrogator = shared.interrogator
        if interrogator.blip_model is None:
            interrogator.blip_model = interrogator.load_blip_model()
            if not shared.cmd_opts.no_half and not interrogator.running_on_cpu:
                interrogator.blip_model = interrogator.blip_model.half()
        interrogator.blip_model = interrogator.blip_model.to(devices.device_interrogate)
        # generate_caption() casts the image to this; load() would take it from CLIP, in the same precision.
        interrogator.dtype = next(interrogator.blip_model.parameters()).dtype

    def caption(self, images: list) -> list[str]:
        from modules import shared

        return [shared.interrogator.generate_caption(image) for image in images]

    def unload(self) -> None:
        from modules import shared

        # Honours "keep models in memory"; safe with nothing loaded.
        shared.interrogator.unload()


class A1111DeepDanbooru:
    """``modules.deepbooru.model``. Threshold, spaces, escaping, sorting and the filter list come
    from A1111's settings; score weights ("(tag:0.9)") are never written into a caption."""

    name = "a1111-deepdanbooru"

    def load(self, device, dtype) -> None:
        from modules import deepbooru

        deepbooru.model.start()

    def caption(self, images: list) -> list[str]:
        from modules import deepbooru

        return [deepbooru.model.tag_multi(image, force_disable_ranks=True) for image in images]

    def unload(self) -> None:
        from modules import deepbooru

        # stop() would fail on a model that never loaded.
        if deepbooru.model.model is not None:
            deepbooru.model.stop()


def _on_gpu(sd_model) -> bool:
    if getattr(sd_model, "lowvram", False):
        return True
    first = next(iter(sd_model.parameters()), None)
    return first is not None and first.device.type != "cpu"


@contextlib.contextmanager
def model_moved_to_cpu():
    """A1111's Stable Diffusion model waits in RAM while the block runs, and returns afterwards,
    also when the block raises. With --medvram/--lowvram only the part A1111 holds on the GPU moves.

    Reads ``sd_models.model_data.sd_model`` rather than ``shared.sd_model``: the latter loads a
    checkpoint when none is loaded. A model already in RAM (Settings → "Unload SD checkpoint to
    RAM") stays there.
    """
    from modules import devices, sd_models

    sd_model = sd_models.model_data.sd_model
    moved = sd_model is not None and _on_gpu(sd_model)
    if moved:
        sd_models.send_model_to_cpu(sd_model)
    try:
        yield
    finally:
        if moved:
            sd_models.send_model_to_device(sd_model)
        devices.torch_gc()


def webui_device_and_dtype():
    """Where A1111 wants interrogation to run (``--use-cpu interrogate`` moves it to the CPU) and in
    which precision (``--no-half`` and the CPU mean fp32)."""
    import torch
    from modules import devices, shared

    device = devices.device_interrogate
    if shared.cmd_opts.no_half or device.type == "cpu":
        return device, torch.float32
    return device, devices.dtype


def caption_project_in_webui(project, captioner, **kwargs):
    """:func:`~lorakit_ext.caption.runner.caption_project` with A1111's model in RAM meanwhile, on
    A1111's interrogation device unless ``device``/``dtype`` are given."""
    device, dtype = webui_device_and_dtype()
    kwargs.setdefault("device", device)
    kwargs.setdefault("dtype", dtype)
    with model_moved_to_cpu():
        return caption_project(project, captioner, **kwargs)

"""Headless sampling with a LoRA merged in, for the CLI's epoch grid (A1111 uses its own sampler)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from PIL import Image

from lorakit_ext.export.apply import apply_lora_file, target_weight
from lorakit_ext.export.writer import read_lora_file


@contextlib.contextmanager
def lora_merged(sd_model, path: Path | None, multiplier: float, family):
    """Merges a LoRA into ``sd_model`` (of ``family``) for the duration of the block and puts back
    the exact original weights."""
    if path is None:
        yield
        return
    tensors, _ = read_lora_file(path)
    roots = family.component_roots(sd_model)
    weights = {}
    for name in {key.partition(".")[0] for key in tensors}:
        component, module_path = family.module_path_from_kohya(name)
        weight = target_weight(roots[component], module_path)[0]
        # SD2's q, k and v share one packed weight: back it up once.
        weights[id(weight)] = weight
    weights = list(weights.values())
    backup = [w.detach().clone() for w in weights]
    try:
        apply_lora_file(sd_model, path, family, multiplier)
        yield
    finally:
        with torch.no_grad():
            for weight, saved in zip(weights, backup):
                weight.copy_(saved)


@torch.no_grad()
def sample(model, prompt: str, negative: str, *, seed: int, size: tuple[int, int], steps: int = 20, cfg: float = 7.0) -> Image.Image:
    """One DDIM sample from a :class:`~lorakit_ext.models.ldm.LdmModel` (ε or v), as a PIL image."""
    from ldm.models.diffusion.ddim import DDIMSampler

    sd_model = model.sd_model
    width, height = size
    # ldm's sampler conditions on the cross-attention alone, which is all an ldm model takes.
    cond = model.encode_tokens(model.tokenize([prompt]))["crossattn"]
    uncond = model.encode_tokens(model.tokenize([negative]))["crossattn"]
    shape = (4, height // 8, width // 8)
    noise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed)).to(model.device)
    dtype = next(model.unet.parameters()).dtype
    autocast = torch.autocast("cuda", dtype=dtype) if model.device.type == "cuda" and dtype != torch.float32 else contextlib.nullcontext()
    # ldm's sampler prints a banner and a progress bar per image; the caller reports progress.
    with autocast, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        latents, _ = DDIMSampler(sd_model).sample(
            S=steps, batch_size=1, shape=shape, conditioning=cond, verbose=False, eta=0.0, x_T=noise,
            unconditional_guidance_scale=cfg, unconditional_conditioning=uncond,
        )
        pixels = sd_model.decode_first_stage(latents.to(dtype))
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)

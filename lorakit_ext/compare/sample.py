"""Headless sampling with a LoRA merged in, for the CLI's epoch grid (A1111 uses its own sampler)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from PIL import Image

from lorakit_ext.export.apply import apply_lora_file, target_weight
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.train.loss import NoiseSchedule


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


def ddim_timesteps(steps: int) -> list[int]:
    """ldm's "uniform" DDIM steps, descending: every ``1000 // steps``-th step, offset by one.
    Exactly ``steps`` of them: where 1000 is no multiple of ``steps`` ldm's own list gets one more,
    ending at 1000, past the schedule's last index."""
    stride = NoiseSchedule.steps // steps
    return [t + 1 for t in range(0, NoiseSchedule.steps, stride)][:steps][::-1]


@torch.no_grad()
def sample(model, prompt: str, negative: str, *, seed: int, size: tuple[int, int], steps: int = 20, cfg: float = 7.0,
           zero_terminal_snr: bool = False) -> Image.Image:
    """One deterministic DDIM sample (η = 0) from any :class:`~lorakit_ext.models.base.DiffusionModel`,
    ε or v, through its own conditioning (SDXL's size conditioning: the image's size, no crop), as a
    PIL image. ``zero_terminal_snr``: the schedule the model was trained with."""
    width, height = size
    schedule = NoiseSchedule(model.device, zero_terminal=zero_terminal_snr)
    alphas = schedule.sqrt_alpha**2
    sizes = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32, device=model.device)
    ids = model.tokenize([negative, prompt]).to(model.device)
    dtype = next(model.unet.parameters()).dtype
    autocast = torch.autocast("cuda", dtype=dtype) if model.device.type == "cuda" and dtype != torch.float32 else contextlib.nullcontext()
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, height // 8, width // 8), generator=generator).to(model.device)
    timesteps = ddim_timesteps(steps)
    with autocast:
        cond = model.condition(model.encode_text(ids), sizes)
        for i, t in enumerate(timesteps):
            a = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
            out = model.predict(torch.cat([x, x]).to(dtype), torch.full((2,), t, device=model.device), cond).float()
            uncond, text = out.chunk(2)
            guided = uncond + cfg * (text - uncond)
            if model.parameterization == "v":
                eps = a.sqrt() * guided + (1 - a).sqrt() * x
                x0 = a.sqrt() * x - (1 - a).sqrt() * guided
            else:
                eps = guided
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        pixels = model.decode_latents(x)
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def headless_sampler(model, *, steps: int = 20, zero_terminal_snr: bool = False):
    """A :data:`~lorakit_ext.train.sampling.Sampler` drawing with :func:`sample` (the CLI's): each
    prompt at its seed, written as PNG where the request says."""
    from lorakit_ext.fsutil import atomic_write_bytes

    def draw(request) -> list[Path]:
        paths = []
        for index, (prompt, seed) in enumerate(zip(request.prompts, request.seeds)):
            image = sample(model, prompt, "", seed=seed, size=request.size, steps=steps, zero_terminal_snr=zero_terminal_snr)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path = request.path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        return paths

    return draw

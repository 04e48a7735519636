"""The diffusion training objective, as kohya sd-scripts' ``train_network.py`` computes it.

Everything here is tensor-in, tensor-out with no host synchronisation, so it can run inside a
captured CUDA graph.
"""

from __future__ import annotations

import torch


class NoiseSchedule:
    """SD's DDPM schedule (β 0.00085 → 0.012, scaled-linear, 1000 steps), computed in fp32 by us
    rather than read from the model, whose buffers may be fp16 inside A1111."""

    steps = 1000

    def __init__(self, device: torch.device | str):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, self.steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.sqrt_alpha = alphas_cumprod.sqrt().float().to(device)
        self.sqrt_one_minus_alpha = (1.0 - alphas_cumprod).sqrt().float().to(device)
        self.snr = (alphas_cumprod / (1.0 - alphas_cumprod)).float().to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
        return a * latents + s * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
        return a * noise - s * latents


def draw_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device)
    return noise


def draw_timesteps(batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randint(0, NoiseSchedule.steps, (batch,), generator=generator, device=device)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    snr: torch.Tensor,
    min_snr_gamma: float,
    v_prediction: bool,
) -> torch.Tensor:
    """Mean over the batch of per-sample MSE (averaged over C,H,W), min-SNR weighted when γ > 0."""
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        clipped = torch.clamp(snr, max=min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1) if v_prediction else clipped / snr)
    return per_sample.mean()

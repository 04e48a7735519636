"""The diffusion training objective, as kohya sd-scripts' ``train_network.py`` computes it.

Everything here is tensor-in, tensor-out with no host synchronisation, so it can run inside a
captured CUDA graph.
"""

from __future__ import annotations

import torch


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so that its last step is pure noise (SNR 0), keeping the first step
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; kohya's
    ``--zero_terminal_snr``, A1111's "Zero Terminal SNR" noise schedule)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


class NoiseSchedule:
    """SD's DDPM schedule (β 0.00085 → 0.012, scaled-linear, 1000 steps), computed in fp32 by us
    rather than read from the model, whose buffers may be fp16 inside A1111. ``zero_terminal``
    rescales it with :func:`zero_terminal_snr` (for v-prediction models trained that way)."""

    steps = 1000

    def __init__(self, device: torch.device | str, zero_terminal: bool = False):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, self.steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        if zero_terminal:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
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


def draw_noise(shape: tuple[int, ...], device, generator: torch.Generator | None, noise_offset: float,
               multires_iterations: int = 0, multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise of latents' ``shape``, with kohya's noise offset or, instead, its
    multi-resolution ("pyramid") noise: the two are alternatives in sd-scripts, which applies the
    offset when both are set (LoRA Kit's settings refuse that combination)."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        b, c = shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=device)
    elif multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like``: at level ``i`` noise drawn at 1/rⁱ of the size (r drawn in
    [2, 4) per level, on the host, from torch's CPU generator) is upsampled bilinearly and added with
    weight discountⁱ, down to a 1-pixel side; the sum is scaled back to unit standard deviation.
    The sizes change every step, so a step with it cannot be captured in a CUDA graph."""
    b, c, height, width = noise.shape
    for level in range(iterations):
        r = 2 + 2 * float(torch.rand(()))
        small_h, small_w = max(1, int(height / r**level)), max(1, int(width / r**level))
        coarse = torch.randn((b, c, small_h, small_w), device=noise.device, dtype=noise.dtype)
        noise = noise + torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()


def draw_timesteps(batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randint(0, NoiseSchedule.steps, (batch,), generator=generator, device=device)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    snr: torch.Tensor,
    min_snr_gamma: float,
    v_prediction: bool,
    *,
    scale_v_like_noise: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of per-sample MSE (averaged over C,H,W), min-SNR weighted when γ > 0
    (v-prediction: min(SNR, γ)/(SNR + 1)). ``scale_v_like_noise`` (v only) then multiplies by
    SNR/(SNR + 1), SNR capped at 1000, as kohya's ``--scale_v_pred_loss_like_noise_pred``; both
    weights are 0 at a zero-terminal-SNR schedule's last step. ``weights`` (one per sample) multiply
    each sample's loss last, as kohya's ``loss_weights`` (prior_loss_weight for regularisation images)."""
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        clipped = torch.clamp(snr, max=min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1) if v_prediction else clipped / snr)
    if scale_v_like_noise and v_prediction:
        capped = torch.clamp(snr, max=1000.0)
        per_sample = per_sample * (capped / (capped + 1))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()

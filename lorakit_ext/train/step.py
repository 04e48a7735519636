"""One training step as a function of tensors: ``(latents, text, image sizes) → loss``.

``text`` is the captions' token ids, or, when the text encoders are frozen and their outputs were
cached (``cache_text_encoder_outputs``), the encoders' states for them
(:class:`~lorakit_ext.train.text_cache.TextCache`).

Everything inside is device work with no host synchronisation and no host-side decisions: noise
and timesteps come from the device RNG, gradients are zeroed in place (static), fp16 loss scaling
checks for inf/NaN on the device and the fused optimiser skips its update by itself. That is what
lets :mod:`lorakit_ext.train.graphs` capture the step in a CUDA graph; the eager path runs the very
same function, so both give the same numbers.
"""

from __future__ import annotations

import contextlib

import torch

from lorakit_ext.train.loss import diffusion_loss, draw_noise, draw_timesteps

# torch.cuda.amp.GradScaler's defaults, applied on the device.
_INIT_SCALE, _GROWTH, _BACKOFF, _INTERVAL = 2.0**16, 2.0, 0.5, 2000


def step_autocast(device: torch.device, precision):
    """The autocast the step computes under (none where the weights already have the step's dtype)."""
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)


@torch.no_grad()
def frozen_text_states(model, precision, ids: torch.Tensor):
    """The frozen encoders' states for ``ids`` as a step computes them (same function, same
    precision): what cached states must equal for a cached run to train on the same numbers."""
    with step_autocast(model.device, precision):
        return model.encode_text(ids)


class DeviceLossScale:
    """fp16 loss scaling that never reads a value back to the host."""

    def __init__(self, device: torch.device):
        self.scale = torch.full((), _INIT_SCALE, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), device=device)

    def unscale(self, grads: list[torch.Tensor]) -> None:
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, _GROWTH, _BACKOFF, _INTERVAL)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


class StepFunction:
    def __init__(self, model, schedule, config, precision, params, optimizer, train_te: bool, text_cached: bool = False,
                 sync=None, half_weights=None):
        self.sync = sync  # averages the gradients over data-parallel ranks (train.data_parallel), None: one process
        self.half_weights = half_weights  # the forward's half copies of params (train.half_weights), or None
        self.model = model
        self.schedule = schedule
        self.config = config
        self.precision = precision
        self.params = params
        self.optimizer = optimizer
        self.train_te = train_te
        self.text_cached = text_cached
        self.v = model.parameterization == "v"
        self.loss_scale = self.grad_scaler = None
        if precision.scaler and is_fused_adamw(optimizer):
            self.loss_scale = DeviceLossScale(model.device)
            # The fused AdamW skips its update (and un-counts the step) when found_inf is non-zero.
            optimizer.found_inf = self.loss_scale.found_inf
        elif precision.scaler:
            # Other optimisers cannot skip an update on the device: torch's scaler decides on the host.
            self.grad_scaler = torch.amp.GradScaler(model.device.type)

    @property
    def host_sync_reason(self) -> str | None:
        """Why this step cannot run without the host (and so cannot be captured), or None."""
        reason = settings_sync_reason(self.config)
        if reason:
            return reason
        if self.grad_scaler is not None:
            return f"fp16 loss scaling with {type(self.optimizer).__name__} needs the host-side GradScaler"
        return None

    def _autocast(self):
        return step_autocast(self.model.device, self.precision)

    def _text_states(self, text):
        if self.text_cached:
            return text
        with contextlib.nullcontext() if self.train_te else torch.no_grad():
            return self.model.encode_text(text)

    def _prediction(self, latents, states, sizes, noise, timesteps, input_noise=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's output for the noised latents, and what it should have been. ``input_noise``
        (input perturbation) noises the latents in place of ``noise``, which stays the target."""
        with self._autocast():
            cond = self.model.condition(states, sizes)
            noisy = self.schedule.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
            pred = self.model.predict(noisy, timesteps, cond)
        target = self.schedule.velocity(latents, noise, timesteps) if self.v else noise
        return pred, target

    def loss(self, latents, text, sizes, noise, timesteps, input_noise=None, weights=None):
        with self._autocast():
            states = self._text_states(text)
        pred, target = self._prediction(latents, states, sizes, noise, timesteps, input_noise)
        return diffusion_loss(pred, target, self.schedule.snr[timesteps], self.config.min_snr_gamma, self.v,
                              scale_v_like_noise=self.config.scale_v_pred_loss_like_noise_pred, weights=weights)

    @torch.no_grad()
    def prediction_error(self, latents, states, sizes, noise, timesteps) -> torch.Tensor:
        """Each image's plain mean squared error (no loss weighting) given text ``states``: what
        validation measures."""
        pred, target = self._prediction(latents, states, sizes, noise, timesteps)
        return (pred.float() - target.float()).square().mean(dim=(1, 2, 3))

    def __call__(self, latents: torch.Tensor, text, sizes: torch.Tensor, *, weights: torch.Tensor | None = None,
                 first: bool = True, last: bool = True, rows=None) -> torch.Tensor:
        """One batch: its gradients start a new optimizer step (``first``) or add to the current
        one, and ``last`` takes the optimizer step. Each batch's loss is divided by
        ``gradient_accumulation_steps``, as accelerate divides it for kohya; ``weights`` (one per
        image, None: all 1) weight each image's loss, as kohya's ``loss_weights``. ``rows`` (a
        :class:`~lorakit_ext.train.data_parallel.Rows`): ``latents`` are these rows of a larger
        batch, whose noise is drawn whole so every rank draws what one process would."""
        if first:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            if self.half_weights is not None:
                self.half_weights.refresh()
        c = self.config
        total, keep = (latents.shape[0], slice(None)) if rows is None else (rows.total, slice(rows.start, rows.start + rows.count))
        noise = draw_noise((total, *latents.shape[1:]), latents.device, None, c.noise_offset, c.multires_noise_iterations,
                           c.multires_noise_discount)
        timesteps = draw_timesteps(total, None, latents.device)[keep]
        # kohya's input perturbation: the latents are noised a little more than the target says.
        input_noise = (noise + c.ip_noise_gamma * torch.randn_like(noise))[keep] if c.ip_noise_gamma else None
        noise = noise[keep]
        loss = self.loss(latents, text, sizes, noise, timesteps, input_noise, weights)
        share = loss / c.gradient_accumulation_steps if c.gradient_accumulation_steps > 1 else loss
        if self.grad_scaler is not None:
            share = self.grad_scaler.scale(share)
        elif self.loss_scale is not None:
            share = share * self.loss_scale.scale
        share.backward()
        if self.half_weights is not None:
            self.half_weights.fold_gradients()
        if self.grad_scaler is not None:
            return self._host_scaled_step(loss) if last else loss.detach().float()
        if not last:
            return loss.detach().float()
        self._sync()
        if self.loss_scale is not None:
            self.loss_scale.unscale([p.grad for p in self.params if p.grad is not None])
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, foreach=self.model.device.type == "cuda")
        self.optimizer.step()
        if self.loss_scale is not None:
            self.loss_scale.update()
        return loss.detach().float()

    def _sync(self) -> None:
        if self.sync is not None:
            self.sync([p.grad for p in self.params if p.grad is not None])

    def _host_scaled_step(self, loss: torch.Tensor) -> torch.Tensor:
        self._sync()
        self.grad_scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss.detach().float()

    def scaler_state(self) -> dict | None:
        scaler = self.loss_scale or self.grad_scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        scaler = self.loss_scale or self.grad_scaler
        if scaler is not None and state is not None:
            scaler.load_state_dict(state)


def settings_sync_reason(config) -> str | None:
    """Why a run's settings alone keep its steps on the host (out of CUDA graphs), or None."""
    if config.multires_noise_iterations and not config.noise_offset:
        return "multires noise draws its pyramid at new sizes every step"
    return None


def is_fused_adamw(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))

"""Samples while training: every ``sample_every_n_epochs`` epochs (and after the last), and every
``sample_every_n_steps`` optimizer steps, the sample prompts are drawn with the LoRA as trained so far, by whatever sampler the front door brings (the
WebUI: A1111's own; headless: :func:`~lorakit_ext.compare.sample.sample`).

Drawing must not change the training: it runs in eval mode (no network dropout) without gradients,
inside forked random streams, and the model goes back to training mode afterwards; the base weights
are never touched (the LoRA is applied by the injected network, not merged).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lorakit_ext.dataset.tags import typical_prompt

SAMPLES_FOLDER = "samples"


@dataclass(frozen=True)
class SampleRequest:
    epoch: int
    prompts: list[str]
    seeds: list[int]  # one per prompt
    size: tuple[int, int]  # width, height
    folder: Path  # where the images go: the run's samples/
    stem: str  # file names: <stem>-<epoch>-<n>.png, or <stem>-step<step>-<n>.png mid-epoch
    step: int | None = None  # drawn after this optimizer step rather than at the epoch's end

    def path(self, index: int) -> Path:
        when = f"{self.epoch:02d}" if self.step is None else f"step{self.step:08d}"
        return self.folder / f"{self.stem}-{when}-{index + 1}.png"


# Draws a request's images (one per prompt, at its seed) and returns where they were written.
Sampler = Callable[[SampleRequest], list[Path]]


def sampling_on(config) -> bool:
    """Whether a run draws samples at all (a front door then brings a sampler)."""
    return bool(config.sample_every_n_epochs or config.sample_every_n_steps)


def sampling_due(config, epoch: int, epochs: int) -> bool:
    every = config.sample_every_n_epochs
    return bool(every) and (epoch % every == 0 or epoch == epochs)


def sampling_due_at_step(config, step: int) -> bool:
    every = config.sample_every_n_steps
    return bool(every) and step % every == 0


def sample_request(config, captions: Sequence[str], epoch: int, run_dir: Path, stem: str, step: int | None = None) -> SampleRequest:
    prompts = [line.strip() for line in config.sample_prompt.splitlines() if line.strip()]
    prompts = prompts or [typical_prompt(captions, config.trigger.strip())]
    return SampleRequest(epoch, prompts, [config.seed + i for i in range(len(prompts))],
                         (config.resolution, config.resolution), Path(run_dir) / SAMPLES_FOLDER, stem, step)


@contextlib.contextmanager
def sampling_mode(roots: Sequence[torch.nn.Module], text_encoders: Sequence[torch.nn.Module], device: torch.device):
    """Eval mode for the LoRA's modules and no gradients, training's random streams kept, and text
    encoders parked elsewhere for the run (their outputs cached) on ``device`` meanwhile."""
    away = [(m, next(m.parameters()).device) for m in text_encoders if next(m.parameters()).device != device]
    for module, _ in away:
        module.to(device)
    for root in roots:
        root.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            yield
    finally:
        for root in roots:
            root.train()
        for module, where in away:
            module.to(where)

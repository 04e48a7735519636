"""Latents kept on disk between runs (kohya's ``cache_latents_to_disk``): a second run, a resume or
a change of learning rate skips the VAE for every image it has seen at the same size.

One file per (image content, bucket, resize, mirror, VAE) under the project's ``.cache/latents/``,
named by a hash of all of them, so an edited image, another bucket or another model's VAE never
reads a stale latent. Each file holds the latent one VAE pass sampled: a run that finds them all
uses the same latents as the run that wrote them (and draws no random numbers for them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors.torch
import torch

from lorakit_ext.fsutil import atomic_write_bytes

FOLDER = Path(".cache") / "latents"


def vae_identity(model) -> str:
    """What sets a VAE's latents apart: the family (its scale factor) and the VAE's own weights,
    sampled at its first and last tensors (a full hash of 80 MB per run would cost more than it saves)."""
    digest = hashlib.sha256(model.family.name.encode())
    params = list(model.vae.state_dict().items())
    for name, tensor in (params[0], params[-1]):
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class LatentStore:
    def __init__(self, project_path: Path, vae: str):
        self.folder = Path(project_path) / FOLDER
        self.vae = vae
        self._content: dict[Path, str] = {}

    def _content_hash(self, image: Path) -> str:
        if image not in self._content:
            self._content[image] = hashlib.sha256(Path(image).read_bytes()).hexdigest()
        return self._content[image]

    def path(self, image: Path, bucket, resized, flipped: bool) -> Path:
        key = f"{self._content_hash(image)}|{tuple(bucket)}|{tuple(resized)}|{flipped}|{self.vae}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def get(self, image: Path, bucket, resized, flipped: bool) -> torch.Tensor | None:
        path = self.path(image, bucket, resized, flipped)
        try:
            return safetensors.torch.load(path.read_bytes())["latent"]
        except (OSError, KeyError, safetensors.SafetensorError):
            return None  # not there, or unreadable: encode it again

    def put(self, image: Path, bucket, resized, flipped: bool, latent: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = safetensors.torch.save({"latent": latent.detach().float().cpu().contiguous()})
        atomic_write_bytes(self.path(image, bucket, resized, flipped), data)

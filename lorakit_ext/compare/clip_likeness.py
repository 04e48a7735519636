"""How close each epoch's grid cells come to the training images as CLIP sees them: the mean, over
an epoch's cells, of the cosine similarity between a cell's CLIP image embedding and the nearest
training image's. Pixels (``epoch_metrics.likeness``) compare colours and composition; CLIP
compares what is in the picture (a face, an outfit), which is what a character LoRA should learn.

Only a CLIP model already on this machine is used, never a download:
- ``LORAKIT_CLIP_MODEL``: a folder in transformers' layout (``config.json`` and weights), or
- ``openai/clip-vit-large-patch14`` in the Hugging Face cache. Every A1111 that loaded an SD1.x
  model has it: A1111 builds SD1's text encoder from that repository, whose weight file holds the
  image tower too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
# OpenAI CLIP's preprocessing (its image processor's values).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def local_clip_model() -> str | None:
    """The folder of a CLIP model on this machine (see the module docstring), or None."""
    configured = os.environ.get("LORAKIT_CLIP_MODEL", "").strip()
    if configured:
        folder = Path(configured).expanduser()
        return str(folder) if (folder / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(CLIP_HUB_ID, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return str(folder) if any((folder / name).is_file() for name in _WEIGHTS) else None


class ClipEmbedder:
    """CLIP's image tower and projection, loaded from ``folder`` alone (no network)."""

    def __init__(self, folder: str, device: torch.device | str = "cpu"):
        from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type") == "clip":
            # A whole CLIP: the image tower's projection width is the top-level one.
            whole = CLIPConfig.from_pretrained(folder, local_files_only=True)
            config = whole.vision_config
            config.projection_dim = whole.projection_dim
        else:
            config = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)
        from transformers.utils import logging as hf_logging

        # The text tower's weights in a whole CLIP's file are unused here, which transformers warns about.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, config=config, local_files_only=True, torch_dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.to(self.device).eval()
        self.side = int(self.model.config.image_size)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB")
        scale = self.side / min(rgb.size)
        rgb = rgb.resize((max(self.side, round(rgb.width * scale)), max(self.side, round(rgb.height * scale))), Image.Resampling.BICUBIC)
        left, top = (rgb.width - self.side) // 2, (rgb.height - self.side) // 2
        crop = np.asarray(rgb.crop((left, top, left + self.side, top + self.side)), dtype=np.float32) / 255
        return ((torch.from_numpy(crop) - torch.tensor(_MEAN)) / torch.tensor(_STD)).permute(2, 0, 1)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], batch: int = 16) -> torch.Tensor:
        """Unit-length embeddings ``[len(images), D]`` (float32, on the CPU)."""
        out = []
        for start in range(0, len(images), batch):
            pixels = torch.stack([self._pixels(image) for image in images[start : start + batch]])
            embeds = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).image_embeds.float().cpu()
            out.append(torch.nn.functional.normalize(embeds, dim=-1))
        return torch.cat(out)

    def release(self) -> None:
        self.model.to("cpu")
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def clip_likeness(columns: dict[str, list[Image.Image]], training_images: list[Image.Image], embed) -> dict[str, float]:
    """``{column label: mean over its cells of the cosine similarity to the nearest training image}``
    (1.0: a cell CLIP cannot tell from a training image)."""
    if not training_images or not columns:
        return {}
    training = embed(training_images)
    return {label: float((embed(cells) @ training.T).max(dim=1).values.mean()) for label, cells in columns.items()}

"""What a run computes once before its first step: text-encoder outputs (where cached), the
training and validation latents, and where the model's modules wait meanwhile.

A mixin of :class:`~lorakit_ext.train.loop.Trainer`: it uses the trainer's model, config, job,
world, device, precision, callbacks and ``_phase`` timer.
"""

from __future__ import annotations

import torch

from lorakit_ext.train import gpu_memory
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train.data import LatentCache
from lorakit_ext.train.events import Progress
from lorakit_ext.train.latent_store import LatentStore, vae_identity
from lorakit_ext.train.plan import MAX_VALIDATION_IMAGES
from lorakit_ext.train.step import frozen_text_states
from lorakit_ext.train.text_cache import TextCache
from lorakit_ext.train.validation import ValidationSet


class StartCaches:
    def _vae_batch_size(self) -> int:
        # Four 512² images per VAE batch on a GPU, fewer at larger sizes (one at SDXL's 1024²), so
        # the encoder's activations stay about the same size.
        return max(1, 4 * 512**2 // self.config.resolution**2) if self.device.type == "cuda" else 1

    def _cache_latents(self, items, buckets) -> LatentCache:
        def progress(done, total):
            self.on_progress(Progress("caching", step=done, total_steps=total, message=f"caching latents {done}/{total}"))

        return LatentCache.build(
            items,
            buckets,
            self.model.encode_images,
            vae_batch_size=self._vae_batch_size(),
            device=self.device,
            flip_aug=self.config.flip_aug,
            progress=progress,
            should_stop=self.should_stop,
            # Data-parallel ranks other than 0 read what rank 0 stored; they never write it.
            store=LatentStore(self.job.project.path, vae_identity(self.model)) if self.config.cache_latents_to_disk else None,
        )

    def _validation_captions(self, data) -> list[str] | None:
        """The captions of the images validation measures (None: no validation in this process)."""
        if not self.config.validate_every_n_epochs or not self.world.main:
            return None
        # Held-out images, else the training images; regularisation images are not what the LoRA learns.
        items = data.validation_items or [item for item in data.items if not item.regularisation]
        return [item.caption for item in items][:MAX_VALIDATION_IMAGES]

    def _validation_set(self, data, cache: LatentCache) -> ValidationSet | None:
        """The images validation measures: the held-out ones (their latents encoded now, from a
        random stream of their own so training's is unchanged), else the training images."""
        captions = self._validation_captions(data)
        if captions is None:
            return None
        if not data.validation_items:
            # Regularisation images come last in the cache: the training images' indices come first.
            return ValidationSet.build(cache, captions, data.buckets, self.config.seed, held_out=False)
        plan = bucket_plan_for(self.config, [item.size for item in data.validation_items])
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed + 1)
            held = LatentCache.build(data.validation_items, plan, self.model.encode_images, device=self.device,
                                     should_stop=self.should_stop)
        return ValidationSet.build(held, captions, plan, self.config.seed, held_out=True)

    def _cache_text(self, captions: list[str]) -> TextCache:
        def progress(done, total):
            self.on_progress(Progress("caching", step=done, total_steps=total, message=f"caching text-encoder outputs {done}/{total}"))

        return TextCache.build(captions, lambda chunk: frozen_text_states(self.model, self.precision, self.model.tokenize(chunk)),
                               progress=progress, should_stop=self.should_stop)

    def _cache_before_steps(self, data, residency: gpu_memory.Residency):
        """Text-encoder outputs first where they are cached: the encoders then leave the GPU for
        the run (as kohya's do) before the VAE's activations join the model. Then the latents; the
        VAE leaves after them. The UNet waits on the CPU meanwhile only where the GPU lacks room
        for the VAE's activations beside it: a round trip costs seconds, and with room to spare
        the peak is the resident model's either way."""
        model, encoders = self.model, list(self.model.text_encoders.values())
        text_cache = validation_text = None
        if self.config.cache_text_encoder_outputs:
            with self._phase("text_outputs"):
                text_cache = self._cache_text([item.caption for item in data.items])
                held = self._validation_captions(data)
                validation_text = self._cache_text(held) if held else None
            # Idle until the run ends; sample prompts bring them back.
            residency.away(*encoders)
        vae_bytes = gpu_memory.VAE_BYTES_PER_PIXEL * self._vae_batch_size() * self.config.resolution**2
        if not gpu_memory.has_room(self.device, vae_bytes):
            self.on_progress(Progress("caching", message=f"the UNet waits on the CPU while latents cache: the VAE needs about "
                                                         f"{vae_bytes / 2**30:.1f} GiB beside it and the GPU has less free"))
            residency.away(model.unet, *encoders)
        with self._phase("latents"), self.world.main_first(self.config.cache_latents_to_disk):
            cache = self._cache_latents(data.items, data.buckets)
        with self._phase("validation_latents"):
            validation = self._validation_set(data, cache)
        residency.away(model.vae)
        residency.back(model.unet, *([] if self.config.cache_text_encoder_outputs else encoders))
        return cache, validation, text_cache, validation_text

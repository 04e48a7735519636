"""Latents kept on disk (kohya's ``cache_latents_to_disk``): a second run reads every latent it has
and encodes none, and an edited image, another size or another VAE is encoded afresh."""

from __future__ import annotations

import torch
from tiny_datasets import fill_dataset

from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train.data import LatentCache, load_train_items
from lorakit_ext.train.latent_store import FOLDER, LatentStore, vae_identity
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig

CONFIG = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128)


class CountingEncoder:
    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return torch.randn(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)


def _build(items, store, flip=True):
    encoder = CountingEncoder()
    cache = LatentCache.build(items, bucket_plan_for(CONFIG, [i.size for i in items]), encoder, flip_aug=flip, store=store)
    return cache, encoder.images


def test_a_second_build_reads_every_latent_and_an_edited_image_alone_is_encoded_again(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    items = load_train_items(project.dataset)
    first, encoded = _build(items, LatentStore(project.path, "vae-a"))
    assert encoded == 2 * len(items)  # each image and its mirror
    assert len(list((project.path / FOLDER).iterdir())) == 2 * len(items)
    again, encoded = _build(items, LatentStore(project.path, "vae-a"))
    assert encoded == 0
    assert all(torch.equal(first.get(i, f), again.get(i, f)) for i in range(len(items)) for f in (False, True))
    from PIL import Image

    Image.new("RGB", (64, 64), (5, 5, 5)).save(project.dataset / "img0.png")  # the image changed
    _, encoded = _build(load_train_items(project.dataset), LatentStore(project.path, "vae-a"))
    assert encoded == 2
    _, encoded = _build(items, LatentStore(project.path, "vae-b"))  # another VAE
    assert encoded == 2 * len(items)


def test_a_run_with_the_option_encodes_nothing_the_second_time(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    counts = []
    for name in ("a", "b"):
        sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
        model = LdmModel(sd_model.eval(), clip_skip=2)
        calls = []
        encode = model.encode_images
        model.encode_images = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
        config = CONFIG.replace(num_repeats=1, max_train_epochs=1, optimizer="AdamW", network_dim=4, cache_latents_to_disk=True,
                                output_name=name).validate()
        job = TrainJob(config, project, tmp_path / name, project.runs / name, base_model_name="tiny-sd15")
        job.run_dir.mkdir(parents=True)
        Trainer(model, job).run()
        counts.append(sum(calls))
    assert counts == [4, 0]
    sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    assert len(vae_identity(LdmModel(sd_model, clip_skip=2))) == 64

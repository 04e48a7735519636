import io
import json
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit_ext.errors import UserError
from lorakit_ext.train.buckets import (
    assign_bucket,
    bucket_plan_for,
    make_buckets,
    no_upscale_bucket,
    plan_buckets,
    resize_and_crop_box,
    steps_per_epoch,
)
from lorakit_ext.train.captions_step import process_caption
from lorakit_ext.train.data import (
    EpochBatches,
    LatentCache,
    TrainItem,
    check_batch_size,
    image_size,
    load_image_for_bucket,
    load_train_items,
)
from lorakit_ext.train.events import Interrupted, Progress
from lorakit_ext.train.plan import make_plan
from lorakit_ext.train_config import TrainConfig

SD15 = make_buckets(512, 256, 1024, 64)


# ---- buckets ---------------------------------------------------------------------------------


def test_kohya_bucket_list_for_sd15_defaults():
    # kohya sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), checked against its code
    assert SD15 == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    for w, h in SD15:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert (h, w) in SD15


def test_no_bucket_side_below_the_minimum_even_when_the_max_side_allows_it():
    buckets = make_buckets(512, 256, 2048, 64)
    assert min(min(b) for b in buckets) == 256 and max(max(b) for b in buckets) == 1024


def test_larger_resolution_keeps_its_area_and_the_max_side():
    buckets = make_buckets(768, 256, 1024, 64)
    assert (768, 768) in buckets and (1024, 576) in buckets and (576, 1024) in buckets
    assert all(w * h <= 768 * 768 and max(w, h) <= 1024 for w, h in buckets)


@pytest.mark.parametrize(
    "size,bucket",
    [
        ((1000, 1000), (512, 512)),  # square
        ((600, 900), (384, 640)),  # 2:3 portrait: 0.6 is closer to 0.667 than 0.778
        ((1920, 1080), (640, 384)),  # 16:9 landscape
        ((5000, 500), (1024, 256)),  # panorama beyond every bucket: the widest one, cropped
        ((100, 2000), (256, 1024)),  # very tall strip: the tallest one
        ((448, 576), (448, 576)),  # already a bucket size: that bucket
    ],
)
def test_images_go_to_the_closest_aspect_ratio(size, bucket):
    assert assign_bucket(size, SD15) == bucket


def test_aspect_ratio_tie_goes_to_the_first_bucket_in_sorted_order():
    # 768x1024 (0.75) is exactly 0.25 from both 0.5 and 1.0; numpy argmin in kohya takes the first
    assert assign_bucket((768, 1024), [(512, 512), (256, 512)]) == (256, 512)


def test_zero_sized_image_is_refused():
    with pytest.raises(UserError, match="0x512"):
        assign_bucket((0, 512), SD15)


@pytest.mark.parametrize(
    "size,bucket,resized",
    [
        ((300, 200), (256, 192), (300, 200)),  # small: cropped to the step, never scaled
        ((512, 512), (512, 512), (512, 512)),
        ((1000, 700), (576, 384), (576, 403)),  # large: shrunk to about 512² pixels
    ],
)
def test_no_upscale_buckets(size, bucket, resized):
    assert no_upscale_bucket(size, 512, 64) == (bucket, resized)


def test_no_upscale_refuses_an_image_narrower_than_a_step():
    with pytest.raises(UserError, match="40x300"):
        no_upscale_bucket((40, 300), 512, 64)


@pytest.mark.parametrize("size", [(1000, 1000), (600, 900), (1920, 1080), (5000, 500), (333, 777), (200, 200)])
def test_resize_and_crop_give_exactly_the_bucket(size):
    bucket = assign_bucket(size, SD15)
    resized, (left, top, right, bottom) = resize_and_crop_box(size, bucket)
    assert (right - left, bottom - top) == bucket
    assert 0 <= left and 0 <= top and right <= resized[0] and bottom <= resized[1]
    assert abs(resized[0] / resized[1] - size[0] / size[1]) < 0.02  # aspect kept, no stretching


def test_bucketing_off_puts_everything_in_the_square():
    plan = plan_buckets([(1920, 1080), (600, 900), (512, 512)], 512, enable_bucket=False)
    assert list(plan.buckets) == [(512, 512)]


def test_real_steps_per_epoch_versus_the_plan_estimate():
    sizes = [(1000, 1000)] * 5 + [(600, 900)] * 3 + [(1920, 1080)]
    plan = plan_buckets(sizes, 512)
    assert plan.counts() == {(384, 640): 3, (512, 512): 5, (640, 384): 1}
    assert plan.buckets[(512, 512)] == [0, 1, 2, 3, 4]
    # ceil(50/4) + ceil(30/4) + ceil(10/4): each bucket's last batch is short
    assert plan.steps_per_epoch(10, 4) == steps_per_epoch([5, 3, 1], 10, 4) == 13 + 8 + 3 == 24
    assert make_plan(9, 10, 4).steps_per_epoch == 22.5
    assert plan.describe(10, 4).splitlines() == [
        "384x640: 3 images",
        "512x512: 5 images",
        "640x384: 1 image",
        "3 buckets: 24 steps per epoch after bucketing (a batch never mixes buckets, so a bucket's last batch may be short).",
    ]
    info = json.loads(json.dumps(plan.bucket_info(10)))
    assert info["buckets"]["1"] == {"resolution": [512, 512], "count": 50}
    assert info["mean_img_ar_error"] > 0


def test_plan_from_config_honours_no_upscale():
    plan = bucket_plan_for(TrainConfig(bucket_no_upscale=True), [(300, 200)])
    assert list(plan.buckets) == [(256, 192)]


# ---- captions per step -----------------------------------------------------------------------

CAPTION = "kat3r1na, 1girl, red hair, smile, outdoors, blue eyes, jacket"


def test_keep_tokens_never_move_and_the_rest_is_shuffled():
    orders = set()
    for seed in range(40):
        out = process_caption(CAPTION, 2, True, 0.0, random.Random(seed)).split(", ")
        assert out[:2] == ["kat3r1na", "1girl"]
        assert sorted(out) == sorted(CAPTION.split(", "))
        orders.add(tuple(out))
    assert len(orders) > 10


def test_without_shuffle_the_caption_is_used_as_written():
    assert process_caption("b,  a ,c", 1, False, 0.0, random.Random(0)) == "b,  a ,c"


def test_caption_dropout_empties_captions():
    rng = random.Random(0)
    assert {process_caption(CAPTION, 1, True, 1.0, rng) for _ in range(20)} == {""}
    assert "" not in {process_caption(CAPTION, 1, True, 0.0, rng) for _ in range(20)}
    assert process_caption(CAPTION, 1, False, 0.0, rng, dropped_epoch=True) == ""


def test_tag_dropout_leaves_out_tags_but_never_the_kept_ones():
    kept = []
    for seed in range(200):
        out = process_caption(CAPTION, 2, False, 0.0, random.Random(seed), tag_dropout_rate=0.3).split(", ")
        assert out[:2] == ["kat3r1na", "1girl"] and set(out) <= set(CAPTION.split(", "))
        kept.append(len(out) - 2)
    # 5 droppable tags at 30 %: about 3.5 stay on average.
    assert 3.2 < sum(kept) / len(kept) < 3.8
    same = [process_caption(CAPTION, 2, True, 0.0, random.Random(7), tag_dropout_rate=0.3) for _ in range(2)]
    assert same[0] == same[1]


# ---- dataset items and images ----------------------------------------------------------------


def _save(path, size, color=(200, 30, 30), **kw):
    Image.new("RGB", size, color).save(path, **kw)
    return path


def test_load_train_items_reads_sizes_captions_and_warns(tmp_path):
    _save(tmp_path / "b.png", (640, 480))
    (tmp_path / "b.txt").write_text("kat3r1na, smile", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: upright it is portrait
    _save(tmp_path / "a.jpg", (300, 200), exif=exif)
    items = load_train_items(tmp_path)
    assert [i.image_path.name for i in items] == ["a.jpg", "b.png"]
    assert items[0].size == (200, 300) and items[1].size == (640, 480)
    assert items[1].caption == "kat3r1na, smile" and items[1].warning is None
    assert items[0].caption == "" and "no caption" in items[0].warning
    assert load_image_for_bucket(items[0].image_path, (128, 192)).shape == (3, 192, 128)


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="has no images; import some first"):
        load_train_items(tmp_path)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_train_items(tmp_path)


def test_loaded_image_is_the_centre_of_the_picture(tmp_path):
    image = Image.new("RGB", (1200, 600), (255, 0, 0))
    image.paste((0, 255, 0), (300, 0, 900, 600))  # green centre, red sides
    image.save(tmp_path / "wide.png")
    pixels = load_image_for_bucket(tmp_path / "wide.png", (512, 512))
    assert pixels.shape == (3, 512, 512) and pixels.min() >= -1 and pixels.max() <= 1
    inner = pixels[:, :, 8:-8]
    assert inner[1].mean() > 0.95 and inner[0].mean() < -0.95  # only the green centre is left


def test_no_upscale_image_is_cropped_not_scaled(tmp_path):
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    image.putpixel((22, 4), (255, 255, 255))  # the crop box's top-left pixel
    image.save(tmp_path / "small.png")
    (bucket,) = plan_buckets([(300, 200)], 512, no_upscale=True).placements
    pixels = load_image_for_bucket(tmp_path / "small.png", bucket.bucket, resized_size=bucket.resized)
    assert pixels.shape == (3, 192, 256)
    assert pixels[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and pixels[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_flip_mirrors_the_image(tmp_path):
    image = Image.new("RGB", (128, 128), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 128))
    image.save(tmp_path / "left.png")
    plain = load_image_for_bucket(tmp_path / "left.png", (128, 128))
    mirrored = load_image_for_bucket(tmp_path / "left.png", (128, 128), flip=True)
    assert plain[:, :, 0].mean() == 1 and mirrored[:, :, -1].mean() == 1 and mirrored[:, :, 0].mean() == -1


# ---- latent cache ----------------------------------------------------------------------------


class FakeVAE:
    """Deterministic stand-in for the VAE: 8x8 average pooling plus a left-to-right ramp, so the
    latent of a mirrored image is not the mirrored latent (as with the real VAE)."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, pixels):
        self.calls.append(tuple(pixels.shape))
        pooled = F.avg_pool2d(pixels, 8)
        ramp = torch.linspace(0, 1, pooled.shape[-1])
        out = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) + ramp
        return out if self.result is None else self.result(out)


def _dataset(tmp_path, sizes):
    items = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"{n:02d}.png"
        image = Image.new("RGB", size, (20 * n, 100, 250 - 20 * n))
        image.paste((255, 255, 255), (0, 0, size[0] // 3, size[1]))  # asymmetric: flips matter
        image.save(path)
        items.append(TrainItem(path, f"tag{n}, a, b, c", size))
    return items, plan_buckets(sizes, 64, min_reso=32, max_reso=128, step=16)


SIZES = [(64, 64), (64, 64), (64, 64), (48, 80), (48, 80)]


def test_cache_encodes_each_image_once_in_same_bucket_batches(tmp_path):
    items, plan = _dataset(tmp_path, SIZES)
    vae, progress = FakeVAE(), []
    cache = LatentCache.build(items, plan, vae, vae_batch_size=2, progress=lambda d, t: progress.append((d, t)))
    assert sorted(vae.calls) == [(1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 80, 48)]
    assert progress[-1] == (5, 5) and len(progress) == 3
    assert len(cache) == 5 and not cache.has_flipped
    assert cache.get(0).shape == (4, 8, 8) and cache.get(3).shape == (4, 10, 6)


def test_flip_aug_caches_latents_of_the_mirrored_images(tmp_path):
    items, plan = _dataset(tmp_path, SIZES)
    vae = FakeVAE()
    cache = LatentCache.build(items, plan, vae, vae_batch_size=4, flip_aug=True, dtype=torch.float16)
    assert sum(shape[0] for shape in vae.calls) == 10  # plain and mirrored, once each
    pixels = load_image_for_bucket(items[3].image_path, (48, 80))
    assert cache.get(3, flipped=True).dtype == torch.float16
    expected = FakeVAE()(pixels.flip(-1)[None])[0].half()
    assert torch.equal(cache.get(3, flipped=True), expected)
    assert not torch.allclose(cache.get(3, flipped=True), cache.get(3))
    assert not torch.allclose(cache.get(3, flipped=True), cache.get(3).flip(-1))


def test_interrupt_stops_caching(tmp_path):
    items, plan = _dataset(tmp_path, SIZES)
    vae, asked = FakeVAE(), []
    with pytest.raises(Interrupted):
        LatentCache.build(items, plan, vae, should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert len(vae.calls) == 1


def test_images_are_read_ahead_of_the_vae_and_a_stop_leaves_no_reads_behind(tmp_path, monkeypatch):
    from lorakit_ext.train import data

    items, plan = _dataset(tmp_path, SIZES * 2)  # 10 images, batches of 1
    read, seen_at_encode = [], []
    monkeypatch.setattr(data, "load_image_for_bucket", lambda path, *a, **k: read.append(path) or load_image_for_bucket(path, *a, **k))

    def vae(pixels):
        seen_at_encode.append(len(read))
        return FakeVAE()(pixels)

    asked = []
    with pytest.raises(Interrupted):
        LatentCache.build(items, plan, vae, should_stop=lambda: asked.append(1) or len(asked) > 4)
    assert len(seen_at_encode) == 4
    assert seen_at_encode[0] > 1  # the next images were asked for before the first batch was encoded
    # Reads stop with the run: no more than the batches queued ahead (2) beyond the ones encoded;
    # a stop may cancel those before they start.
    assert 4 <= len(read) <= 4 + 2
    # The same latents as read one by one.
    cache = LatentCache.build(items, plan, FakeVAE())
    one = load_image_for_bucket(items[7].image_path, plan.placements[7].bucket, resized_size=plan.placements[7].resized)
    assert torch.equal(cache.get(7), FakeVAE()(one[None])[0])


def test_nan_latents_name_the_image(tmp_path):
    items, plan = _dataset(tmp_path, SIZES)
    with pytest.raises(UserError, match=r"NaN .* 03\.png.*--no-half-vae"):
        LatentCache.build(items, plan, FakeVAE(lambda out: out / (out.shape[-1] - 6)), vae_batch_size=2)


# ---- epoch batches ---------------------------------------------------------------------------


MIXED = [(1000, 1000)] * 5 + [(600, 900)] * 3 + [(1920, 1080)]
MIXED_PLAN = plan_buckets(MIXED, 512)


def _cache(flip=False):
    """Latents of bucket size whose values say which image (and whether mirrored) they are."""

    def latent(i, bucket, mirrored):
        return torch.full((4, bucket[1] // 8, bucket[0] // 8), float(i) + (0.5 if mirrored else 0.0))

    buckets = [p.bucket for p in MIXED_PLAN.placements]
    plain = [latent(i, b, False) for i, b in enumerate(buckets)]
    mirrored = [latent(i, b, True) for i, b in enumerate(buckets)] if flip else None
    return LatentCache(plain, mirrored)


CAPTIONS = [f"trigger, tag{i}, x, y, z" for i in range(len(MIXED))]


def _epoch(epoch=0, seed=42, flip=False, **kw):
    options = dict(batch_size=4, num_repeats=10, keep_tokens=1, shuffle_tags=True)
    return EpochBatches(_cache(flip), CAPTIONS, MIXED_PLAN, epoch=epoch, seed=seed, **{**options, **kw})


def test_batches_stay_in_one_bucket_and_see_every_image_repeats_times():
    batches = list(_epoch())
    assert len(batches) == len(_epoch()) == MIXED_PLAN.steps_per_epoch(10, 4) == 24
    seen = Counter()
    for batch in batches:
        assert all(MIXED_PLAN.placements[i].bucket == batch.bucket for i in batch.indices)
        w, h = batch.bucket
        assert batch.latents.shape == (len(batch.indices), 4, h // 8, w // 8)
        assert batch.latents[:, 0, 0, 0].tolist() == [float(i) for i in batch.indices]
        assert [c.split(", ")[0] for c in batch.captions] == ["trigger"] * len(batch.indices)
        seen.update(batch.indices)
    assert seen == {i: 10 for i in range(len(MIXED))}
    # the buckets' batches are interleaved, not run bucket after bucket
    assert len({b.bucket for b in batches[:6]}) > 1


def _fingerprint(epoch_batches):
    return [(b.bucket, b.indices, b.captions, b.flipped, b.latents.sum().item()) for b in epoch_batches]


def test_same_seed_and_epoch_repeat_exactly_and_resume_mid_epoch():
    first = _fingerprint(_epoch(epoch=3, flip=True))
    again = _epoch(epoch=3, flip=True)
    assert _fingerprint(again) == first
    assert _fingerprint([again[k] for k in range(17, len(again))]) == first[17:]
    next_epoch = _fingerprint(_epoch(epoch=4, flip=True))
    assert [f[:2] for f in next_epoch] != [f[:2] for f in first]  # another batch order
    assert [f[2] for f in next_epoch] != [f[2] for f in first]  # other caption shuffles
    assert _fingerprint(_epoch(epoch=3, seed=43, flip=True)) != first


def test_flip_aug_mirrors_about_half_the_samples():
    flips = [(i, f, lat) for b in _epoch(flip=True) for i, f, lat in zip(b.indices, b.flipped, b.latents[:, 0, 0, 0].tolist())]
    assert 25 <= sum(f for _, f, _ in flips) <= 65
    assert all(lat == i + (0.5 if f else 0.0) for i, f, lat in flips)
    assert not any(f for b in _epoch(flip=False) for f in b.flipped)


def test_caption_dropout_in_batches():
    captions = [c for b in _epoch(caption_dropout_rate=0.5) for c in b.captions]
    assert 20 <= captions.count("") <= 70


def test_every_nth_epoch_counted_from_one_trains_on_empty_captions():
    def captions(epoch):
        return {c for b in _epoch(epoch=epoch, caption_dropout_every_n_epochs=2) for c in b.captions}

    assert "" not in captions(0) and captions(1) == {""} and "" not in captions(2) and captions(3) == {""}


def test_batch_larger_than_dataset_is_refused():
    with pytest.raises(UserError, match=r"batch size 12 is larger than the 9 images"):
        _epoch(batch_size=12)
    with pytest.raises(UserError, match=r"batch size 2 is larger than the 1 image in"):
        check_batch_size(1, 2)


def test_progress_rejects_unknown_phase():
    assert Progress("training", epoch=1, epochs=10, step=5, total_steps=630, loss=0.1).loss == 0.1
    with pytest.raises(ValueError, match="phase"):
        Progress("dreaming")


def _png_with_exif_after_the_data(path, size, orientation):
    """A PNG whose eXIf chunk follows IDAT (PIL itself writes it before)."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, "PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:]  # without the "Exif\0\0" prefix JPEG uses
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


def test_sizes_come_from_png_headers_without_decoding_and_late_exif_still_turns_them(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    _save(tmp_path / "plain.png", (640, 480))
    _png_with_exif_after_the_data(tmp_path / "late.png", (300, 200), 6)
    with Image.open(tmp_path / "late.png") as opened:
        assert "exif" not in opened.info  # PIL finds this one only by decoding
    assert image_size(tmp_path / "late.png") == (200, 300)

    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self) or load(self))
    assert image_size(tmp_path / "plain.png") == (640, 480) and decoded == []

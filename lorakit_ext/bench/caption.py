"""How fast captioning runs: BLIP-large and a WD v3 ViT tagger at full size with random weights.

Nothing is downloaded: the networks are built from the published models' sizes, written below,
and run through the same captioner classes as real captions (preprocessing included, decoding
images from disk excluded). Random weights never finish a sentence on their own, so every BLIP
caption is made exactly ``--blip-tokens`` long; a real BLIP-large caption with the default
settings is 10–20 tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from lorakit_ext.caption.base import resolve_device, resolve_dtype
from lorakit_ext.caption.blip import BlipCaptioner
from lorakit_ext.caption.wd import CHARACTER, GENERAL, RATING, TagTable, WdTagger, build_model
from lorakit_ext.errors import UserError

# Salesforce/blip-image-captioning-large: a ViT-L/16 at 384 px; the text decoder keeps
# BlipTextConfig's BERT-base defaults (30 524 tokens, 768 wide, 12 layers).
BLIP_LARGE = {
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
    },
    "text_config": {"num_attention_heads": 12},
    "projection_dim": 512,
    "image_text_hidden_size": 256,
}
BLIP_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# SmilingWolf/wd-vit-tagger-v3's config.json.
WD_VIT = {
    "architecture": "vit_base_patch16_224",
    "num_classes": 10861,
    "model_args": {"img_size": 448, "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"},
    "pretrained_cfg": {"input_size": [3, 448, 448], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
}
WD_RATINGS, WD_CHARACTERS = 4, 2800


def synthetic_blip_processor(folder: Path, vocab_size: int, image_size: int, words: list[str] = ()):
    """A ``BlipProcessor`` laid out like the real one (BERT word pieces, ``[DEC]`` as the decoder's
    start token, 2 ids above the BERT vocabulary) from a made-up vocabulary of ``vocab_size`` ids:
    the special tokens, ``words``, then fillers."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    base = BLIP_SPECIAL + list(words)
    fillers = [f"w{i}" for i in range(vocab_size - 2 - len(base))]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(base + fillers + ["[DEC]", "[ENC]"]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def blip_large(device, dtype, folder: Path, tokens: int, beams: int) -> BlipCaptioner:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig(**BLIP_LARGE)
    processor = synthetic_blip_processor(folder, config.text_config.vocab_size, config.vision_config.image_size)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    captioner = BlipCaptioner("random-blip-large", beams=beams, min_length=tokens, max_length=tokens)
    captioner.attach(model, processor, device, dtype)
    return captioner


def wd_vit(device, dtype) -> WdTagger:
    import torch

    with torch.device(device):
        model = build_model(WD_VIT)
        # A trained tagger is sure of a few dozen tags; random weights would put half of the
        # 10 861 over the threshold and time the sorting of tag names instead of the network.
        torch.nn.init.constant_(model.get_classifier().bias, -6.0)
    n = WD_VIT["num_classes"]
    categories = np.full(n, GENERAL)
    categories[:WD_RATINGS] = RATING
    categories[n - WD_CHARACTERS :] = CHARACTER
    tagger = WdTagger("random-wd-vit")
    tagger.attach(model, WD_VIT["pretrained_cfg"], TagTable([f"tag_{i}" for i in range(n)], categories), device, dtype)
    return tagger


def bench_images(n: int, seed: int = 0) -> list:
    """Photo-sized noise in portrait and landscape, so WD's padding and both resizes do real work."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(768, 512), (512, 768), (640, 640)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8), "RGB") for i in range(n)]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float | None:
    """The process's memory high-water mark (so it only grows from row to row); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(captioner, images: list, batch: int, device) -> dict:
    """Images per second over all ``images`` after one warm-up batch, and the peak memory."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    captioner.caption(images[:batch])
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        captioner.caption(images[i : i + batch])
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU allocated"
    else:
        peak, kind = _peak_rss_mb(), "process RSS"
    return {
        "batch": batch,
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 2),
        "peak_memory_mb": None if peak is None else round(peak, 1),
        "memory_kind": kind,
    }


def _batches(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes batch sizes like 1,8,32, not {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"{option}: batch sizes must be at least 1")
    return values


def run_caption_bench(blip_batches, wd_batches, images: int, device=None, dtype=None, blip_tokens: int = 20, beams: int = 1) -> dict:
    import torch

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    pictures = bench_images(max([images, *blip_batches, *wd_batches]))
    rows = []
    if blip_batches:
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-blip-") as tmp:
            captioner = blip_large(device, dtype, Path(tmp), blip_tokens, beams)
            rows += [{"model": "BLIP-large", **measure(captioner, pictures[: max(images, b)], b, device)} for b in blip_batches]
            captioner.unload()
    if wd_batches:
        tagger = wd_vit(device, dtype)
        rows += [{"model": "WD ViT v3", **measure(tagger, pictures[: max(images, b)], b, device)} for b in wd_batches]
        tagger.unload()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "blip_tokens": blip_tokens,
        "beams": beams,
        "results": rows,
    }


def _text(report: dict) -> str:
    lines = [
        f"caption bench on {report['device']} ({report['dtype']}), random full-size weights, warm-up batch "
        f"excluded; BLIP captions {report['blip_tokens']} tokens, {report['beams']} beam(s)"
    ]
    for r in report["results"]:
        lines.append(
            f"  {r['model']:<11} batch {r['batch']:>3}: {r['images_per_s']:>8.2f} images/s "
            f"({r['images']} images in {r['seconds']:.2f} s)"
            + (f", peak {r['memory_kind']} {r['peak_memory_mb']:.0f} MB" if r["peak_memory_mb"] is not None else "")
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--blip-batch", default="1,8,32", help="BLIP-large batch sizes, comma-separated ('' skips BLIP)")
    parser.add_argument("--wd-batch", default="32", help="WD ViT batch sizes, comma-separated ('' skips WD)")
    parser.add_argument("--images", type=int, default=256, help="images timed per batch size (default 256; use 2–8 on a CPU)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16")
    parser.add_argument("--blip-tokens", type=int, default=20, help="length of every BLIP caption in tokens (default 20)")
    parser.add_argument("--beams", type=int, default=1, help="BLIP beam search width (default 1)")


def run_cli(args) -> tuple[dict, str]:
    if args.images < 1 or args.blip_tokens < 2 or args.beams < 1:
        raise UserError("--images and --beams must be at least 1, --blip-tokens at least 2")
    report = run_caption_bench(
        _batches(args.blip_batch, "--blip-batch"),
        _batches(args.wd_batch, "--wd-batch"),
        args.images,
        args.device,
        args.dtype,
        args.blip_tokens,
        args.beams,
    )
    return report, _text(report)


BENCH_CLI = {"caption": (add_arguments, run_cli)}

"""CUDA-graph training steps against the eager path. Needs a CUDA GPU (skipped elsewhere)."""

from __future__ import annotations

import os

# Deterministic cuBLAS/attention kernels: eager and captured steps must then agree closely, and a
# difference points at the capture, not at atomics' summation order.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open

from lorakit_ext.models.families import adapter_for
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def _dataset(folder, n=8, caption="kat3r1na"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(3, 16, 16, generator=g) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).resize((256, 256)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{caption}, tag{i % 3}, red hair")


def _train(tmp_path, name, weights, world=None, compile_blocks=False, **config):
    from lorakit_ext.models.tiny import build_random_sd15
    from lorakit_ext.train.data_parallel import World

    torch.manual_seed(0)
    sd_model = build_random_sd15("cuda", weights, full=False)
    project = create_project(tmp_path / name, "p")
    _dataset(project.dataset)
    if config.get("reg_folders"):
        _dataset(project.path / "reg", 5, caption="woman")
    cfg = TrainConfig(resolution=256, num_repeats=13, max_train_epochs=1, max_train_steps=50, train_batch_size=2,
                      optimizer="AdamW", keep_only_last_n_epochs=0, **config).validate()
    job = TrainJob(cfg, project, tmp_path / name / "out", project.runs / "r", patch_attention=True, world=world or World(),
                   compile_blocks=compile_blocks)
    job.run_dir.mkdir(parents=True)
    messages = []
    trainer = Trainer(adapter_for(sd_model, cfg.clip_skip, cfg.max_token_length), job,
                      on_progress=lambda p: messages.append(p.message) if p.message.startswith("CUDA graphs") else None)
    result = trainer.run()
    with safe_open(str(result.files[-1]), "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    return result.losses, tensors, messages


def _difference(a: dict, b: dict) -> tuple[float, float]:
    keys = sorted(b)
    flat_a = torch.cat([a[k].flatten() for k in keys])
    flat_b = torch.cat([b[k].flatten() for k in keys])
    overall = ((flat_a - flat_b).norm() / flat_b.norm()).item()
    worst = max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in keys)
    return overall, worst


def _trains_alike(label, run, reference_losses, reference_lora, *, tolerance):
    """``run`` (``_train``'s result) was captured with no fallback and matches the reference run:
    losses within ``tolerance`` relative (a tenth of it absolute), the whole LoRA within it."""
    losses, lora, messages = run
    assert messages == [], messages
    assert losses == pytest.approx(reference_losses, rel=tolerance, abs=tolerance / 10)
    overall, worst = _difference(lora, reference_lora)
    print(f"{label}: LoRA weights differ by {overall:.2e} overall, {worst:.2e} in the worst tensor")
    assert overall < tolerance


@pytest.mark.parametrize("weights,precision", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_fifty_captured_steps_match_eager(tmp_path, weights, precision, deterministic):
    eager_losses, eager_lora, _ = _train(tmp_path, "eager", weights, mixed_precision=precision, cuda_graphs=False)
    _, eager2_lora, _ = _train(tmp_path, "eager2", weights, mixed_precision=precision, cuda_graphs=False)
    graph_losses, graph_lora, messages = _train(tmp_path, "graphs", weights, mixed_precision=precision)
    assert messages == [], messages  # captured, no fallback
    assert len(graph_losses) == len(eager_losses) == 50
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
    overall, worst = _difference(graph_lora, eager_lora)
    floor, _ = _difference(eager2_lora, eager_lora)
    print(f"{precision}: LoRA weights differ by {overall:.2e} overall, {worst:.2e} in the worst tensor (eager vs eager: {floor:.2e})")
    # The criterion is the whole network's weights (and the loss curve) within 1e-3. A single
    # tensor can differ more: an up weight starts at zero, so a different summation order of the
    # same sums shows most there; `worst` is printed for the record, not asserted.
    assert overall < 1e-3


def test_accumulated_steps_with_regularisation_images_match_eager(tmp_path, deterministic):
    # Each place in an accumulation group is its own graph; the prior loss weights are an input of each.
    options = dict(mixed_precision="bf16", gradient_accumulation_steps=2, reg_folders="1 reg", prior_loss_weight=0.5)
    eager_losses, eager_lora, _ = _train(tmp_path, "eager", torch.bfloat16, cuda_graphs=False, **options)
    graph_losses, graph_lora, messages = _train(tmp_path, "graphs", torch.bfloat16, **options)
    assert messages == [], messages
    assert len(graph_losses) == len(eager_losses) == 50
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
    overall, worst = _difference(graph_lora, eager_lora)
    print(f"accumulation 2 + regularisation: LoRA weights differ by {overall:.2e} overall, {worst:.2e} in the worst tensor")
    assert overall < 1e-3


def test_compiled_blocks_are_captured_and_train_as_the_stock_blocks(tmp_path):
    stock_losses, stock_lora, _ = _train(tmp_path, "stock", torch.bfloat16, mixed_precision="bf16")
    # Inductor's fused kernels keep fp32 between ops that eager rounds to bf16: close, not equal.
    _trains_alike("compiled blocks vs stock", _train(tmp_path, "compiled", torch.bfloat16, compile_blocks=True, mixed_precision="bf16"),
                  stock_losses, stock_lora, tolerance=1e-2)


def test_the_data_parallel_step_with_one_nccl_rank_is_captured_and_trains_as_one_process(tmp_path, deterministic, monkeypatch):
    # World size 1 through torch.distributed: the all-reduce of the LoRA gradients is inside the
    # captured step (no fallback), and averaging over one rank changes nothing.
    import socket

    from lorakit_ext.train.data_parallel import World

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    plain_losses, plain_lora, _ = _train(tmp_path, "plain", torch.bfloat16, mixed_precision="bf16")
    world = World(0, 1, 0, True)
    with world.process_group(torch.device("cuda", 0)):
        ranks = _train(tmp_path, "ranks", torch.bfloat16, world=world, mixed_precision="bf16")
    _trains_alike("one NCCL rank vs one process", ranks, plain_losses, plain_lora, tolerance=1e-3)


def _two_bucket_dataset(folder, side=256):
    from PIL import Image

    _dataset(folder)
    for i in range(8):
        Image.open(folder / f"{i}.png").resize((side, side)).save(folder / f"{i}.png")
    for i in range(4):  # a second, landscape bucket
        Image.new("RGB", (side * 3 // 2, side), (40 * i, 90, 200)).save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text("kat3r1na, wide")


def test_every_bucket_shape_is_captured_into_the_one_pool_and_recorded(tmp_path):
    import json

    from lorakit_ext.models.tiny import build_random_sd15

    sd_model = build_random_sd15("cuda", torch.bfloat16, full=False)
    project = create_project(tmp_path, "p")
    _two_bucket_dataset(project.dataset)
    cfg = TrainConfig(resolution=256, min_bucket_reso=128, num_repeats=4, max_train_epochs=1, train_batch_size=2, optimizer="AdamW",
                      mixed_precision="bf16", keep_only_last_n_epochs=0, validate_every_n_epochs=0).validate()
    job = TrainJob(cfg, project, tmp_path / "out", project.runs / "r", patch_attention=True)
    job.run_dir.mkdir(parents=True)
    trainer = Trainer(adapter_for(sd_model, cfg.clip_skip, cfg.max_token_length), job)
    trainer.run()
    shapes = {tuple(p["latents"]) for p in trainer.graph_pools}
    assert len(shapes) >= 2, trainer.graph_pools
    print("graph pools:", trainer.graph_pools)
    assert all(len(p["warmup_s"]) == 3 and min(p["warmup_s"]) > 0 for p in trainer.graph_pools)
    assert json.loads((job.run_dir / "run.json").read_text())["graph_pools"] == trainer.graph_pools


def test_run_leaves_the_model_in_place_and_gives_the_memory_back(tmp_path):
    import gc

    from lorakit_ext.models.tiny import build_random_sd15

    sd_model = build_random_sd15("cuda", torch.float16, full=False)
    before = {k: v.clone() for k, v in sd_model.state_dict().items()}
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    project = create_project(tmp_path, "p")
    _dataset(project.dataset)
    cfg = TrainConfig(resolution=256, num_repeats=2, max_train_epochs=1, max_train_steps=8, train_batch_size=2,
                      optimizer="AdamW", keep_only_last_n_epochs=0).validate()
    job = TrainJob(cfg, project, tmp_path / "out", project.runs / "r", patch_attention=True)
    job.run_dir.mkdir(parents=True)
    parked = []
    model = adapter_for(sd_model, cfg.clip_skip, cfg.max_token_length)
    trainer = Trainer(model, job, on_progress=lambda p: parked.append(next(model.vae.parameters()).device.type) if p.phase == "training" and not p.message else None)
    trainer.run()
    del trainer
    gc.collect()
    torch.cuda.synchronize()
    assert set(parked) == {"cpu"}, "the VAE waits on the CPU while training from cached latents"
    after = sd_model.state_dict()
    moved = [k for k, v in after.items() if v.device.type != "cuda"]
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not moved and not changed, (moved[:3], changed[:3])
    assert all(t.is_contiguous() for t in after.values()), "the UNet's weights are back in the standard layout"
    # Graph pools, optimiser state and LoRA weights are gone: only the cached latents' few KiB may stay.
    left = torch.cuda.memory_allocated() - allocated
    assert left < 2**20, f"{left / 2**20:.1f} MiB still allocated after the run"


def test_cached_encoders_leave_the_gpu_before_the_vae_works_and_the_record_says_where_memory_peaked(tmp_path):
    import json

    from lorakit_ext.models.tiny import build_random_sd15

    sd_model = build_random_sd15("cuda", torch.float16, full=False)
    before = {k: v.clone() for k, v in sd_model.state_dict().items()}
    project = create_project(tmp_path, "p")
    _dataset(project.dataset)
    cfg = TrainConfig(resolution=256, num_repeats=2, max_train_epochs=1, max_train_steps=8, train_batch_size=2,
                      optimizer="AdamW", keep_only_last_n_epochs=0, text_encoder_lr=0.0, shuffle_tags=False,
                      cache_text_encoder_outputs=True).validate()
    job = TrainJob(cfg, project, tmp_path / "out", project.runs / "r", patch_attention=True)
    job.run_dir.mkdir(parents=True)
    model = adapter_for(sd_model, cfg.clip_skip, cfg.max_token_length)
    modules = {"unet": model.unet, "te": model.text_encoders["te"], "vae": model.vae}
    seen: dict[str, dict[str, str]] = {}

    def watch(part, module):
        def hook(*args):
            seen.setdefault(part, {name: next(m.parameters()).device.type for name, m in modules.items()})

        module.register_forward_pre_hook(hook)

    watch("vae", model.vae.encoder)
    watch("te", model.text_encoders["te"])
    watch("unet", model.unet)
    Trainer(model, job).run()
    # The encoders' outputs first, then the encoders leave before the VAE works; the GPU has room
    # for the VAE beside the UNet, which therefore stays.
    assert seen == {
        "te": {"unet": "cuda", "te": "cuda", "vae": "cuda"},
        "vae": {"unet": "cuda", "te": "cpu", "vae": "cuda"},
        "unet": {"unet": "cuda", "te": "cpu", "vae": "cpu"},
    }
    after = sd_model.state_dict()
    assert all(v.device.type == "cuda" and torch.equal(v, before[k]) for k, v in after.items())
    peaks = json.loads((job.run_dir / "run.json").read_text())["memory_peaks_gib"]
    assert {"text_outputs", "latents", "to_first_step", "run"} <= set(peaks)
    for kind in ("allocated", "reserved"):
        values = [p[kind] for p in peaks.values()]
        assert values == sorted(values) and values[-1] > 0, peaks


def _two_bucket_run(tmp_path, name, monkeypatch, **config):
    """The run's losses, its graph pools, and how far reserved memory rose above what it was after
    the first capture while later shapes warmed up."""
    from lorakit_ext.models.tiny import build_random_sd15
    from lorakit_ext.train.graphs import GraphedStep

    torch.manual_seed(0)
    sd_model = build_random_sd15("cuda", torch.bfloat16, full=False)
    project = create_project(tmp_path / name, "p")
    _two_bucket_dataset(project.dataset, 512)
    # 512² and 640×384 at batch 4: activations larger than the slack of the allocator's segments.
    cfg = TrainConfig(resolution=512, num_repeats=4, max_train_epochs=2, train_batch_size=4, optimizer="AdamW",
                      mixed_precision="bf16", keep_only_last_n_epochs=0, validate_every_n_epochs=0, **config).validate()
    job = TrainJob(cfg, project, tmp_path / name / "out", project.runs / "r", patch_attention=True)
    job.run_dir.mkdir(parents=True)
    capture, warm_up = GraphedStep._capture, GraphedStep._side_stream
    after_first, growth = [], [0]

    def watched_capture(self, *args):
        graph = capture(self, *args)
        if not after_first:
            after_first.append(torch.cuda.memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        return graph

    def watched_warm_up(self, *args):
        loss = warm_up(self, *args)
        if after_first:
            growth[0] = max(growth[0], torch.cuda.max_memory_reserved() - after_first[0])
        return loss

    monkeypatch.setattr(GraphedStep, "_capture", watched_capture)
    monkeypatch.setattr(GraphedStep, "_side_stream", watched_warm_up)
    trainer = Trainer(adapter_for(sd_model, cfg.clip_skip, cfg.max_token_length), job)
    result = trainer.run()
    return result.losses, trainer.graph_pools, growth[0]


def test_later_bucket_shapes_warm_up_inside_the_pool_and_train_as_eager(tmp_path, deterministic, monkeypatch):
    from lorakit_ext.train import graphs

    eager, _, _ = _two_bucket_run(tmp_path, "eager", monkeypatch, cuda_graphs=False)
    pooled, pools, pooled_growth = _two_bucket_run(tmp_path, "pooled", monkeypatch)
    monkeypatch.setattr(graphs, "_pool_routing", lambda: None)
    _, _, beside_growth = _two_bucket_run(tmp_path, "beside", monkeypatch)
    print(f"later shapes' warm-ups raised reserved memory {pooled_growth / 2**20:.1f} MiB above the first capture inside "
          f"the pool, {beside_growth / 2**20:.1f} MiB beside it; pools {pools}")
    assert len({tuple(p["latents"]) for p in pools}) == 2
    assert pooled == pytest.approx(eager, rel=1e-3, abs=1e-4)
    assert beside_growth > 0 and pooled_growth < beside_growth / 2


def test_a_warm_up_that_keeps_memory_in_the_pool_retires_the_graphs_it_could_corrupt():
    from types import SimpleNamespace

    from lorakit_ext.train.graphs import GraphedStep

    class Step:
        def __init__(self):
            self.layer = torch.nn.Linear(256, 256, device="cuda")
            self.config = TrainConfig(optimizer="AdamW").validate()
            self.model = SimpleNamespace(device=torch.device("cuda"))
            self.host_sync_reason = None
            self.optimizer = torch.optim.AdamW(self.layer.parameters(), capturable=True)
            self.kept = []

        def __call__(self, latents, text, sizes, *, weights=None, first=True, last=True, rows=None):
            if latents.shape[0] == 3 and not self.kept:  # state created lazily for a new shape
                self.kept.append(torch.ones(2**20, device="cuda"))
            loss = self.layer(latents).square().mean()
            loss.backward()
            self.optimizer.step()
            return loss.detach()

    graphed = GraphedStep(Step(), warmup=1)
    text, sizes = torch.zeros(1, 77, dtype=torch.long), torch.zeros(2, 4)
    for _ in range(3):
        graphed(torch.randn(2, 256, device="cuda"), text, sizes)
    assert len(graphed.graphs) == 1 and graphed.warm_in_pool
    graphed(torch.randn(3, 256, device="cuda"), text, sizes)
    assert graphed.graphs == {} and graphed.pool is None and not graphed.warm_in_pool
    for batch in (2, 3, 2):
        graphed(torch.randn(batch, 256, device="cuda"), text, sizes)
    assert len(graphed.graphs) == 2
    assert torch.equal(graphed.step.kept[0], torch.ones(2**20, device="cuda"))
    graphed.release()

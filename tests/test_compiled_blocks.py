"""``--compile-blocks``: the UNet's blocks traced by torch.compile train as the stock blocks.

dynamo traces with the ``eager`` backend here (Inductor's CPU code generation takes minutes on CI's
two cores, and its kernels are torch's to test): what is ours is that every block traces whole,
with LoRA, gradient checkpointing and the run's other forward patches inside, once per shape, and
that all of it comes off after the run. tests/gpu runs the Inductor path captured in CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.cli import main
from lorakit_ext.models import compiled_blocks
from lorakit_ext.project import create_project
from lorakit_ext.train_config import TrainConfig

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=1, optimizer="AdamW",
             network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=1e-4, lr_scheduler="constant",
             validate_every_n_epochs=1, keep_only_last_n_epochs=0, train_batch_size=2)


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)  # two 64×64 and two 64×128 images: two bucket shapes
    return project


def test_compiled_blocks_trace_whole_once_per_shape_and_train_as_the_stock_blocks(tiny_sd15_dir, project, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled_blocks, "BACKEND", "eager")
    config = TrainConfig(**SMALL, gradient_checkpointing=True).validate()
    stock = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "stock", "stock").run()
    limit = getattr(torch._dynamo.config, compiled_blocks._limit_name())
    counters.clear()
    trainer = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "compiled", "compiled")
    trainer.job.compile_blocks = True
    unet = trainer.model.unet
    compiled = trainer.run()
    assert dict(counters["graph_break"]) == {}
    assert 0 < counters["stats"]["unique_graphs"] <= 2 * len(compiled_blocks.unet_blocks(unet))  # 2 bucket shapes
    assert compiled.losses == pytest.approx(stock.losses, rel=1e-5, abs=1e-6)
    assert compiled.validation and [v[2] for v in compiled.validation] == pytest.approx([v[2] for v in stock.validation], rel=1e-5)
    assert not any("forward" in vars(m) for m in unet.modules())
    assert getattr(torch._dynamo.config, compiled_blocks._limit_name()) == limit


def test_only_steps_with_grad_compile_and_each_shape_once(tiny_sd15, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled_blocks, "BACKEND", "eager")
    unet = tiny_sd15[0].model.diffusion_model
    context = torch.randn(2, 77, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features)
    timesteps = torch.tensor([10, 500])
    counters.clear()
    undo = compiled_blocks.compile_blocks(unet)
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), timesteps, context=context)
        assert counters["stats"]["unique_graphs"] == 0  # validation and samples run the stock forward
        unet(torch.randn(2, 4, 8, 8), timesteps, context=context).sum().backward()
        first = counters["stats"]["unique_graphs"]
        unet(torch.randn(2, 4, 8, 8), timesteps, context=context).sum().backward()
        assert 0 < first == counters["stats"]["unique_graphs"]
        unet(torch.randn(2, 4, 8, 16), timesteps, context=context).sum().backward()
        assert first < counters["stats"]["unique_graphs"] <= 2 * first
    finally:
        undo()
    assert not any("forward" in vars(m) for m in unet.modules())


def test_the_cli_flag_reaches_the_run(tiny_sd15_dir, project, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(compiled_blocks, "compile_blocks", lambda unet: seen.append(type(unet).__name__) or (lambda: None))
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(tiny_sd15_dir / "tiny-sd15.safetensors"),
            "--compile-blocks", "--epochs", "1", "--repeats", "1", "--batch-size", "2", "--set=resolution=64",
            "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW", "--set=network_dim=4"]
    assert main(args) == 0, capsys.readouterr().err
    assert seen == ["UNetModel"]


def test_sdxl_blocks_trace_whole_with_the_runs_forwards(tmp_path, monkeypatch):
    from tiny_sdxl import build_tiny_sdxl
    from torch._dynamo.utils import counters

    from lorakit_ext.models.training_forwards import use_training_forwards
    from lorakit_ext.train.checkpointing import configure_checkpointing

    monkeypatch.setattr(compiled_blocks, "BACKEND", "eager")
    unet = build_tiny_sdxl(tmp_path).model.diffusion_model
    context = torch.randn(1, 77, unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.in_features)
    vector = torch.randn(1, unet.label_emb[0][0].in_features)
    latents, timesteps = torch.randn(1, 4, 16, 16), torch.tensor([10])
    stock = unet(latents, timesteps, context=context, y=vector)
    counters.clear()
    # Headless as the trainer sets it up: sgm's attention gets the SDPA forward dynamo can trace.
    undo = [configure_checkpointing(unet, True), use_training_forwards(unet, torch.device("cpu"), stock_attention=True),
            compiled_blocks.compile_blocks(unet)]
    try:
        ours = unet(latents, timesteps, context=context, y=vector)
        ours.sum().backward()
    finally:
        for step in reversed(undo):
            step()
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)

"""``bench train``: the real trainer measured end to end, and the same-run kohya comparison."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit_ext.bench.models import FAMILIES
from lorakit_ext.cli import main

TINY = ["bench", "train", "--tiny", "--images", "8", "--resolution", "64", "--steps", "2", "--warmup", "1", "--json"]

# Stands in for sd-scripts' train_network.py and sdxl_train_network.py, which need their own packages
# and a full-size model: it reads the TOML pair the driver wrote, reports what it was given, and takes
# real torch optimizer steps (which the driver's step clock times) — or fails, when told to, on the
# UNet-only row.
STAND_IN = '''
import json, os, sys, time
from pathlib import Path
import torch
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
train = tomllib.loads(Path(sys.argv[sys.argv.index("--config_file") + 1]).read_text())["train"]
dataset = tomllib.loads(Path(train["dataset_config"]).read_text())
image_dir = Path(dataset["datasets"][0]["subsets"][0]["image_dir"])
tokenizers = Path(train["tokenizer_cache_dir"])
seen = {"script": Path(sys.argv[0]).name, "train": train, "general": dataset["general"],
        "images": len(list(image_dir.glob("*.png"))), "model_exists": Path(train["pretrained_model_name_or_path"]).is_file(),
        "tokenizers": sorted(p.parent.name for p in tokenizers.glob("*/vocab.json"))}
with open(os.environ["STAND_IN_REPORT"], "a") as fh:
    fh.write(json.dumps(seen) + "\\n")
print("stand-in for", train["output_name"])
if train.get("network_train_unet_only") and os.environ.get("STAND_IN_FAIL_UNET"):
    sys.exit("UNet-only row refused")
weight = torch.nn.Parameter(torch.zeros(4))
optimizer = torch.optim.AdamW([weight])
for _ in range(train["max_train_steps"]):
    weight.grad = torch.ones(4)
    optimizer.step()
    time.sleep(0.02)
'''


def stand_in_sd_scripts(tmp_path: Path, monkeypatch, family: str) -> tuple[Path, Path]:
    """An sd-scripts folder whose training scripts are the stand-in, and the file it reports to.
    The family's full-size checkpoint (a minute or more to build) becomes a placeholder file: the
    stand-in only checks that it exists."""
    folder = tmp_path / "sd-scripts"
    folder.mkdir()
    for script in ("train_network.py", "sdxl_train_network.py"):
        (folder / script).write_text(STAND_IN)
    report = tmp_path / "seen.jsonl"
    monkeypatch.setenv("STAND_IN_REPORT", str(report))

    def placeholder(path):
        path.write_bytes(b"random weights")
        return path

    monkeypatch.setitem(FAMILIES, family, dataclasses.replace(FAMILIES[family], write_checkpoint=placeholder))
    return folder, report


@pytest.fixture
def stand_in_sd15_scripts(tmp_path, monkeypatch):
    return stand_in_sd_scripts(tmp_path, monkeypatch, "sd1")


def test_bench_train_measures_the_trainer(capsys):
    assert main(TINY) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["mode"] == "eager" and row["train"] == "TE + UNet" and row["batch"] == 2
    assert row["it_per_s"] > 0 and row["images_per_s"] == 2 * row["it_per_s"]
    # Where the row's start went: caching, the network, the first step.
    assert {"latents", "network", "to_first_step"} <= set(row["phases_s"]) and data["model_build_s"] > 0
    assert "kohya_it_per_s" not in row, "recorded H200 kohya figures are not a reference for the tiny model"


def test_a_finished_row_names_its_speed_and_each_captured_shapes_first_warm_up_step():
    from lorakit_ext.bench.train import RowSpec, row_done_line

    spec = RowSpec("bf16", "unet", 8, False, "graphs", "auto", compiled=True)
    row = {"out_of_memory": False, "it_per_s": 12.345, "graph_warmup_s": [[95.21, 0.2, 0.2], [], [40.0, 0.1]]}
    assert row_done_line(row, spec) == "row bf16-unet-b8-nogc-graphs-auto-compiled: 12.35 it/s, first warm-up step per captured shape 95.2, 40.0 s"
    assert row_done_line({**row, "graph_warmup_s": []}, spec).endswith(": 12.35 it/s")
    assert row_done_line({"out_of_memory": True}, spec).endswith(": out of memory")


def test_compiled_block_rows_run_the_trainer_with_the_blocks_compiled(monkeypatch, capsys):
    from lorakit_ext.models import compiled_blocks

    # What compiling does is tests/test_compiled_blocks.py's; here: each row runs as it says.
    calls = []
    monkeypatch.setattr(compiled_blocks, "compile_blocks", lambda unet: calls.append(unet) or (lambda: None))
    assert main([*TINY, "--compile-blocks", "off,on"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["rows"]
    assert [r["compiled_blocks"] for r in rows] == [False, True] and len(calls) == 1
    assert all(r["it_per_s"] > 0 for r in rows)
    # Each row says it is done as it finishes, before the report: a bench cut short still tells.
    said = [line for line in err.splitlines() if line.startswith("row ")]
    assert len(said) == 2 and said[1].startswith("row fp32-te-b2-") and "-compiled: " in said[1] and " it/s" in said[1]


def test_kernel_kinds_sort_cuda_kernels_and_torch_operators():
    from lorakit_ext.bench.kernel_profile import breakdown, kind_of

    assert kind_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kind_of("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN") == "GEMM" and kind_of("aten::addmm") == "GEMM"
    assert kind_of("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>") == "other"
    assert kind_of("void at::native::group_norm_kernel") == "norm"
    assert kind_of("void at::native::elementwise_kernel<128, 4>") == "elementwise/copy/cast" and kind_of("aten::copy_") == "elementwise/copy/cast"
    assert kind_of("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    result = breakdown([("aten::addmm", 3000.0, 6), ("aten::copy_", 1000.0, 30)], steps=2)
    assert result["step_ms"] == pytest.approx(2.0) and result["floor_it_s"] == pytest.approx(500.0)
    assert result["kinds_ms"] == {"GEMM": 1.5, "elementwise/copy/cast": 0.5} and result["top"][0]["calls"] == 3


def test_the_step_profiler_measures_the_steps_between_its_marks():
    from lorakit_ext.bench.kernel_profile import StepProfiler
    from lorakit_ext.train.events import Progress

    profiler = StepProfiler(torch.device("cpu"), 2, 4)
    conv, weight = torch.nn.Conv2d(4, 4, 3), torch.randn(64, 64)
    for step in range(1, 6):
        conv(torch.randn(1, 4, 16, 16)).sum()
        weight @ weight
        profiler(Progress("training", step=step, total_steps=5))
    kinds = profiler.result["kinds_ms"]
    assert kinds.keys() >= {"convolution", "GEMM"} and profiler.result["step_ms"] == pytest.approx(sum(kinds.values()))
    calls = {kernel["name"]: kernel["calls"] for kernel in profiler.result["top"]}
    assert calls["aten::mm"] == 1  # per step: two steps were profiled, one product each


def _transposed_product(weight):
    return (weight.t().contiguous() @ weight).sum()


def test_the_step_profiler_names_the_lines_that_copy():
    from lorakit_ext.bench.kernel_profile import StepProfiler
    from lorakit_ext.train.events import Progress

    profiler = StepProfiler(torch.device("cpu"), 2, 4, sources=True)
    weight = torch.randn(256, 256)
    for step in range(1, 6):
        _transposed_product(weight)
        profiler(Progress("training", step=step, total_steps=5))
    sources = profiler.result["elementwise_sources"]
    copy = next(row for row in sources if row["op"] == "aten::copy_")
    assert copy["calls"] >= 1 and copy["ms"] > 0
    assert "test_bench_train.py" in copy["callers"][0] and copy["callers"][0].endswith("_transposed_product"), copy
    assert not any("torch/" in frame for row in sources for frame in row["callers"])


def test_kernel_breakdown_adds_each_rows_kinds_to_the_figures_and_the_report(monkeypatch, capsys):
    from lorakit_ext.bench import kernel_profile

    # The profiler itself is tested above; parsing a whole CPU training step's events takes a minute.
    monkeypatch.setattr(kernel_profile.StepProfiler, "_events", lambda self: [("aten::addmm", 6000.0, 8), ("aten::copy_", 2000.0, 40)])
    from lorakit_ext.bench.train_report import report

    assert main([*TINY, "--kernel-breakdown"]) == 0
    figures = json.loads(capsys.readouterr().out)
    (row,) = figures["rows"]
    assert row["kernels"]["kinds_ms"] == {"GEMM": 1.5, "elementwise/copy/cast": 0.5}
    text = report(figures, SimpleNamespace(dim=16, alpha=8.0))
    assert "kernels (fp32 eager TE + UNet b2): 2.0 ms per eager step, a captured step's floor 500.00 it/s: GEMM 1.5 ms (75 %)" in text


def test_kohya_rows_run_train_network_at_our_settings_and_report_ratios(stand_in_sd15_scripts, capsys):
    folder, report = stand_in_sd15_scripts
    args = TINY + ["--train", "te,unet", "--kohya-sd-scripts", str(folder), "--kohya-python", sys.executable]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    te, unet = data["rows"]
    record = te["kohya_record"]
    assert record["kind"] == "kohya" and record["name"] == "te_unet_b2" and record["batch"] == 2
    assert record["steps"] == 3 and record["skip_steps"] == 1 and 0 < record["it_s"] < 50  # 20 ms sleeps
    assert te["kohya_same_run"] and te["kohya_it_per_s"] == record["it_s"]
    assert abs(te["ratio_vs_kohya"] - te["it_per_s"] / record["it_s"]) < 1e-9
    seen_te, seen_unet = (json.loads(line) for line in report.read_text().splitlines())
    assert seen_te["script"] == "train_network.py" and seen_te["model_exists"] and seen_te["images"] == 8  # our rows' dataset
    assert seen_te["tokenizers"] == ["openai_clip-vit-large-patch14"]
    train = seen_te["train"]
    assert (train["network_dim"], train["network_alpha"], train["train_batch_size"]) == (16, 8.0, 2)
    assert (train["mixed_precision"], train["sdpa"], train["cache_latents"], train["max_token_length"]) == ("no", True, True, 225)
    assert train["max_train_steps"] == 3 and "network_train_unet_only" not in train
    assert seen_te["general"]["resolution"] == 64
    assert seen_unet["train"]["network_train_unet_only"] is True
    assert unet["kohya_record"]["name"] == "unet_b2"
    assert any(n.startswith("--tiny:") for n in data["kohya_notes"])


def test_a_failed_kohya_row_is_a_note_with_its_log(stand_in_sd15_scripts, monkeypatch, capsys):
    folder, _ = stand_in_sd15_scripts
    monkeypatch.setenv("STAND_IN_FAIL_UNET", "1")
    # Both given relative to where bench runs, while kohya runs from its own folder.
    monkeypatch.chdir(folder.parent)
    python = os.path.relpath(sys.executable)
    assert main(TINY + ["--train", "te,unet", "--kohya-sd-scripts", folder.name, "--kohya-python", python]) == 0
    data = json.loads(capsys.readouterr().out)
    te, unet = data["rows"]
    assert te["kohya_same_run"] and "kohya_it_per_s" not in unet
    (note,) = [n for n in data["kohya_notes"] if n.startswith("kohya ")]
    assert "kohya unet_b2 gave no result (exit 1, 0 steps)" in note and "UNet-only row refused" in note


def test_kohya_needs_an_sd_scripts_checkout(tmp_path, capsys):
    assert main(TINY + ["--kohya-sd-scripts", str(tmp_path)]) == 2
    assert "has no train_network.py" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.skipif(not os.environ.get("LORAKIT_SD_SCRIPTS"), reason="LORAKIT_SD_SCRIPTS (an sd-scripts checkout) not set")
def test_real_sd_scripts_trains_a_few_steps(capsys):
    """kohya's own train_network.py on the driver's random SD1.5, dataset and TOML pair (minutes on a CPU)."""
    python = os.environ.get("LORAKIT_SD_SCRIPTS_PYTHON", sys.executable)
    args = TINY + ["--steps", "3", "--warmup", "2", "--kohya-sd-scripts", os.environ["LORAKIT_SD_SCRIPTS"], "--kohya-python", python]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["kohya_record"]["steps"] == 5 and row["kohya_it_per_s"] > 0, data["kohya_notes"]


def test_a_row_that_runs_out_of_memory_is_reported_as_such_and_the_next_rows_run(monkeypatch, capsys):
    from lorakit_ext.bench.train_report import report
    from lorakit_ext.train.loop import Trainer

    run = Trainer.run

    def out_of_memory_without_checkpointing(self, *args, **kwargs):
        if not self.config.gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", out_of_memory_without_checkpointing)
    assert main(TINY + ["--gradient-checkpointing", "off,on"]) == 0
    data = json.loads(capsys.readouterr().out)
    off, on = data["rows"]
    assert off["out_of_memory"] and not off["gradient_checkpointing"] and "it_per_s" not in off
    assert on["gradient_checkpointing"] and not on["out_of_memory"] and on["it_per_s"] > 0
    text = report(data, argparse.Namespace(dim=16, alpha=8.0)).splitlines()
    assert " OOM " in text[2] and " OOM " not in text[3]


def test_memory_budget_is_refused_off_cuda(capsys):
    assert main(TINY + ["--device", "cpu", "--memory-budget-gib", "12"]) == 2
    assert "--memory-budget-gib caps CUDA memory" in json.loads(capsys.readouterr().out)["error"]


def test_cached_text_encoder_outputs_are_refused_for_rows_that_train_the_text_encoder(capsys):
    assert main(TINY + ["--train", "te,unet", "--cache-text-encoder-outputs"]) == 2
    assert "needs frozen text encoders" in json.loads(capsys.readouterr().out)["error"]


def _row(mode, batch, it_per_s, processes=1, **extra):
    row = {"weights": "bf16", "mode": mode, "channels_last": "off", "compiled_blocks": False, "train": "unet",
           "text_encoder_outputs_cached": False, "gradient_checkpointing": False, "batch": batch, "precision": "bf16",
           "out_of_memory": False, "it_per_s": it_per_s, "images_per_s": it_per_s * batch * processes,
           "processes": processes, "notes": []}
    row.update(extra)
    return row


def test_report_sets_graphs_against_eager_only_for_the_same_settings():
    from lorakit_ext.bench.train_report import report

    rows = [_row("graphs", 2, 30.0), _row("eager", 2, 10.0), _row("eager", 8, 4.0)]
    figures = {"model": "sd15", "device": "cuda", "resolution": 512, "images": 4, "rows": rows, "kohya_notes": [],
               "memory_budget_gib": None}
    ratios = [line for line in report(figures, SimpleNamespace(dim=16, alpha=8.0)).splitlines() if "graphs vs eager" in line]
    assert ratios == ["graphs vs eager, same run (bf16 eager unet b2): 3.00x"]


def test_ranks_scaling_is_against_the_same_row_in_the_fewest_processes():
    from lorakit_ext.bench.train_ranks import _scaling

    one, two, other = _row("graphs", 2, 10.0), _row("graphs", 2, 9.0, processes=2), _row("eager", 2, 5.0, processes=2)
    _scaling([two, other, one])
    assert one["scaling"] == 1.0 and two["scaling"] == pytest.approx(1.8) and other["scaling"] == 1.0


def test_our_rows_train_every_image_as_kohyas_row_does():
    # kohya's row trains all of the bench's images and measures no validation loss; ours holding
    # 10% out and validating at the end would compare other work, and another memory peak.
    from lorakit_ext.bench.train import _apply_family_defaults, bench_config
    from lorakit_ext.cli import build_parser
    from lorakit_ext.train.plan import plan_for

    args = build_parser().parse_args(["bench", "train", "--images", "126"])
    _apply_family_defaults(args)
    plan = plan_for(bench_config(args, batch=2, unet_only=False, checkpointing=False), 126)
    assert plan.lines[0].startswith("Found 126 images") and not any("Validation" in line for line in plan.lines)


def _activation(x):
    return torch.nn.functional.silu(x)


def test_backward_time_is_put_on_the_forward_lines_it_differentiates():
    from lorakit_ext.bench.kernel_profile import StepProfiler
    from lorakit_ext.train.events import Progress

    profiler = StepProfiler(torch.device("cpu"), 2, 4, sources=True)
    x = torch.randn(64, 4096, requires_grad=True)
    for step in range(1, 6):
        _activation(x).sum().backward()
        profiler(Progress("training", step=step, total_steps=5))
    rows = {row["op"]: row for row in profiler.result["elementwise_sources"]}
    backward = rows["aten::silu_backward"]
    assert backward["callers"][0] == "backward of aten::silu", backward
    assert "test_bench_train.py" in backward["callers"][1] and backward["callers"][1].endswith("_activation"), backward

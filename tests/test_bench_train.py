"""``bench train``: the real trainer measured end to end, and the same-run kohya comparison."""

from __future__ import annotations

import json

from lorakit_ext.cli import main

TINY = ["bench", "train", "--tiny", "--images", "8", "--resolution", "64", "--steps", "2", "--warmup", "1", "--json"]


def _fake_run_device(tmp_path, it_s: float):
    # Stands in for shared/perf-anchor's run_device.sh, which needs a GPU and kohya sd-scripts:
    # the same interface (phases as arguments, records in $OUT/results.jsonl).
    script = tmp_path / "run_device.sh"
    record = {"kind": "kohya", "name": "te_unet_b2", "batch": 2, "it_s": it_s, "smi_peak_mem_MiB": 5724.0,
              "torch_max_memory_reserved_GiB": 4.9}
    script.write_text(
        'mkdir -p "$OUT"; echo "phases: $*" > "$OUT/main.log"\n'
        f"echo '{json.dumps(record)}' >> \"$OUT/results.jsonl\"\n"
    )
    return script


def test_bench_train_measures_the_trainer(capsys):
    assert main(TINY) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["mode"] == "eager" and row["train"] == "TE + UNet" and row["batch"] == 2
    assert row["it_per_s"] > 0 and row["images_per_s"] == 2 * row["it_per_s"]
    assert "kohya_it_per_s" not in row, "recorded H200 kohya figures are not a reference for the tiny model"


def test_compare_kohya_runs_the_matching_phases_and_reports_ratios(tmp_path, capsys):
    script = _fake_run_device(tmp_path, it_s=0.5)
    assert main(TINY + ["--train", "te,unet", "--compare-kohya", str(script)]) == 0
    data = json.loads(capsys.readouterr().out)
    te, unet = data["rows"]
    assert te["kohya_same_run"] and te["kohya_it_per_s"] == 0.5
    assert abs(te["ratio_vs_kohya"] - te["it_per_s"] / 0.5) < 1e-9
    assert te["kohya_smi_peak_gib"] == 5724.0 / 1024 and te["kohya_peak_reserved_gib"] == 4.9
    # The script ran the UNet-only phase too, but it produced no record: said so, with its log.
    assert "kohya_it_per_s" not in unet
    assert any("kohya_unet_b2 gave no result" in n and "phases: setup kohya_te_b2 kohya_unet_b2" in n for n in data["kohya_notes"])


def test_compare_kohya_needs_the_script(tmp_path, capsys):
    assert main(TINY + ["--compare-kohya", str(tmp_path / "missing.sh")]) == 2
    assert "expected perf-anchor's run_device.sh" in json.loads(capsys.readouterr().out)["error"]

"""The README's demo, dataset half (the training half runs the same Trainer as test_train.py)."""

from lorakit_ext.cli import main


def test_demo_runs_the_dataset_pipeline_and_reports_each_step(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), "--no-train"]) == 0
    out = capsys.readouterr().out
    for step in ("1. demo photos", "2. imported", "3. ", "4. caption lint", "5. tag curation", "6. plan"):
        assert step in out, step
    assert "empty.png" in out and "truncated.jpg" in out and "notes.png" in out
    dataset = tmp_path / "kat3r1na-demo" / "dataset"
    captions = [p.read_text(encoding="utf-8") for p in dataset.glob("*.txt")]
    assert captions and all(c.split(", ")[0] == "kat3r1na" for c in captions)
    removed = list((tmp_path / "kat3r1na-demo" / "_removed").glob("*/manifest.json"))
    assert len(removed) == 1
    assert main(["demo", "--root", str(tmp_path), "--no-train"]) == 0
    assert (tmp_path / "kat3r1na-demo-2" / "dataset").is_dir()

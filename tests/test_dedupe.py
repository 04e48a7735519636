from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from lorakit_ext.bench.dedupe import calibrate
from lorakit_ext.bench.dedupe_photos import evaluate_photos, photos_available
from lorakit_ext.cli import main
from lorakit_ext.dataset.dedupe import (
    DEFAULT_THRESHOLDS,
    ImageInfo,
    apply_plan,
    choose_keep,
    cluster,
    find_pairs,
    hash_images,
    plan_dedupe,
    popcount,
)
from lorakit_ext.dataset.trash import undo
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project


def picture(seed: int, size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(8):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x, y, x + int(rng.integers(w // 8, w // 2)), y + int(rng.integers(h // 8, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(0, 2) else draw.rectangle)(box, fill=colour)
    # Sensor-like grain, so a lossless PNG is larger than its JPEG copies, as with real photos.
    grain = rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
    return Image.fromarray((np.asarray(img, np.int16) + grain).clip(0, 255).astype(np.uint8))


def centre_crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return img.crop((dx, dy, w - dx, h - dy))


COPIES_OF_A = {"a.png", "a_small.jpg", "a_crop.png", "a_bright.jpg"}
COPIES_OF_B = {"b.png", "b_q60.jpg"}
DISTINCT = {"c.png", "d.png", "e.png"}


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset_files() -> dict[str, bytes]:
    """The dataset's bytes, made once: encoding grainy PNGs is the slow part of these tests."""
    a, b = picture(1), picture(2, (512, 512))
    files = {
        "a.png": encoded(a, "PNG"),
        "a_small.jpg": encoded(a.resize((384, 288), Image.LANCZOS), "JPEG", quality=75),
        "a_crop.png": encoded(centre_crop(a, 0.05), "PNG"),
        "a_bright.jpg": encoded(ImageEnhance.Brightness(a).enhance(1.08), "JPEG", quality=85),
        "b.png": encoded(b, "PNG"),
        "b_q60.jpg": encoded(b, "JPEG", quality=60),
    }
    files.update({name: encoded(picture(10 + n), "PNG") for n, name in enumerate(sorted(DISTINCT))})
    files.update({f"{name}.txt": f"caption of {name}".encode() for name in ("a", "a_small", "a_crop", "b_q60", "c")})
    files["a_small.caption"] = b"kohya caption"
    return files


@pytest.fixture
def project(tmp_path, dataset_files):
    p = create_project(tmp_path / "root", "kat")
    for name, data in dataset_files.items():
        (p.dataset / name).write_bytes(data)
    return p


def tree(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_plan_finds_copies_and_leaves_distinct_images_alone(project):
    plan = plan_dedupe(project)
    groups = [{m.name for m in c.members} for c in plan.clusters]
    assert groups == [COPIES_OF_A, COPIES_OF_B]
    assert plan.image_count == 9 and plan.errors == []
    assert all(m.distance <= DEFAULT_THRESHOLDS["phash"] for c in plan.clusters for m in c.members)


@pytest.mark.parametrize("method", ["phash", "dhash", "whash"])
def test_no_method_merges_distinct_images(project, method):
    for c in plan_dedupe(project, method).clusters:
        names = {m.name for m in c.members}
        assert names <= COPIES_OF_A or names <= COPIES_OF_B


def test_dhash_finds_resized_and_reencoded_copies(project):
    found = [{m.name for m in c.members} for c in plan_dedupe(project, "dhash").clusters]
    assert {"a.png", "a_small.jpg"} <= found[0] and found[1] == COPIES_OF_B


def test_keep_policy_prefers_pixels_then_file_size(project):
    plan = plan_dedupe(project)
    assert plan.clusters[0].keep == "a.png"  # 640×480 beats the 384×288 and cropped copies
    # b.png and b_q60.jpg have the same pixel count; the PNG is the larger file.
    assert (project.dataset / "b.png").stat().st_size > (project.dataset / "b_q60.jpg").stat().st_size
    assert plan.clusters[1].keep == "b.png"


def dataset_of(tmp_path, files: dict[str, bytes]):
    p = create_project(tmp_path / "root", "kat")
    for name, data in files.items():
        (p.dataset / name).write_bytes(data)
    return p


def with_sky(img: Image.Image) -> Image.Image:
    """``img`` with a bright band on top, as a photo with sky or a lit wall has."""
    pixels = np.asarray(img, np.int16).copy()
    pixels[:140] = pixels[:140] // 5 + 200
    return Image.fromarray(pixels.astype(np.uint8))


def test_the_original_is_kept_over_a_brightened_copy_with_a_bigger_file(tmp_path):
    original = with_sky(picture(4))
    brighter = ImageEnhance.Brightness(original).enhance(1.12)
    files = {"photo.png": encoded(original, "PNG"), "photo_edit.png": encoded(brighter, "PNG", compress_level=0)}
    assert len(files["photo_edit.png"]) > len(files["photo.png"])
    [found] = plan_dedupe(dataset_of(tmp_path, files), workers=1).clusters
    assert {m.name for m in found.members} == set(files)
    assert found.keep == "photo.png" and found.remove == ["photo_edit.png"]


def test_a_lossless_original_is_kept_over_a_larger_jpeg_of_it(tmp_path):
    flat = Image.new("RGB", (640, 480), (40, 90, 160))
    draw = ImageDraw.Draw(flat)
    for n, colour in enumerate([(250, 200, 30), (20, 160, 60), (200, 40, 90)]):
        draw.ellipse((60 + 170 * n, 100 + 40 * n, 260 + 170 * n, 280 + 40 * n), fill=colour)
    files = {"art.png": encoded(flat, "PNG"), "art.jpg": encoded(flat, "JPEG", quality=95)}
    assert len(files["art.jpg"]) > len(files["art.png"])
    [found] = plan_dedupe(dataset_of(tmp_path, files), workers=1).clusters
    assert found.keep == "art.png" and found.remove == ["art.jpg"]


def test_a_crop_from_one_corner_is_found_though_its_hash_is_far(tmp_path):
    a = picture(1)
    w, h = a.size
    files = {"a.png": encoded(a, "PNG"), "a_corner.png": encoded(a.crop((0, 0, w - 32, h - 24)), "PNG")}
    project = dataset_of(tmp_path, files)
    hashes = hash_images(sorted(project.dataset.iterdir()), workers=1).hashes
    assert int(popcount(hashes[0] ^ hashes[1])) > DEFAULT_THRESHOLDS["phash"]
    [found] = plan_dedupe(project, workers=1).clusters
    assert found.keep == "a.png" and found.remove == ["a_corner.png"]


@pytest.mark.skipif(not photos_available(), reason="scikit-image (its sample photographs) is not installed")
def test_default_dedupe_on_real_photographs_finds_copies_and_keeps_look_alikes_apart():
    report = evaluate_photos(seed=0, workers=1)
    assert report["recall"] >= 0.95, report["missed"]
    assert report["precision"] >= 0.98, report["merged"]
    assert report["originals_kept"] == report["planted"], report["kept_copies"]


def test_keep_policy_breaks_full_ties_by_name(tmp_path):
    infos = [ImageInfo(tmp_path / n, 10, 10, 100, 0) for n in ("z.png", "m.png", "q.png")]
    assert infos[choose_keep([0, 1, 2], infos)].path.name == "m.png"


def test_apply_moves_copies_with_captions_and_undo_restores_bytes(project):
    before = tree(project.dataset)
    batch = apply_plan(project, plan_dedupe(project))
    left = set(tree(project.dataset))
    assert left == {"a.png", "a.txt", "b.png", "c.png", "c.txt", "d.png", "e.png"}
    moved = {f.stored_name for f in batch.files}
    assert moved == {"a_small.jpg", "a_small.txt", "a_small.caption", "a_crop.png", "a_crop.txt", "a_bright.jpg", "b_q60.jpg", "b_q60.txt"}
    assert {k: v for k, v in tree(batch.folder).items() if k != "manifest.json"} == {k: before[k] for k in moved}
    manifest = json.loads((batch.folder / "manifest.json").read_text(encoding="utf-8"))
    assert [(c["keep"], sorted(c["removed"])) for c in manifest["extra"]["clusters"]] == [
        ("a.png", ["a_bright.jpg", "a_crop.png", "a_small.jpg"]),
        ("b.png", ["b_q60.jpg"]),
    ]
    undo(project)
    assert tree(project.dataset) == before


def test_keep_override_keeps_the_named_file(project):
    batch = apply_plan(project, plan_dedupe(project), {1: "a_small.jpg"})
    assert (project.dataset / "a_small.jpg").is_file() and (project.dataset / "a_small.caption").is_file()
    assert not (project.dataset / "a.png").exists() and not (project.dataset / "a.txt").exists()
    assert {"a.png", "a.txt"} <= {f.stored_name for f in batch.files}


def test_bad_keep_overrides_are_refused_before_moving(project):
    before = tree(project.dataset)
    plan = plan_dedupe(project)
    with pytest.raises(UserError, match="no cluster 7"):
        apply_plan(project, plan, {7: "a.png"})
    with pytest.raises(UserError, match="not in cluster 1"):
        apply_plan(project, plan, {1: "c.png"})
    assert tree(project.dataset) == before


def test_apply_refuses_when_dataset_changed_since_plan(project):
    plan = plan_dedupe(project)
    with open(project.dataset / "a_small.jpg", "ab") as fh:
        fh.write(b"edited")
    before = tree(project.dataset)
    with pytest.raises(UserError, match="dataset changed since the plan"):
        apply_plan(project, plan)
    (project.dataset / "a_small.jpg").unlink()
    with pytest.raises(UserError, match="dataset changed since the plan"):
        apply_plan(project, plan)
    del before["a_small.jpg"]
    assert tree(project.dataset) == before


def test_unreadable_file_is_listed_not_fatal(project):
    (project.dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (project.dataset / "truncated.jpg").write_bytes((project.dataset / "a_small.jpg").read_bytes()[:200])
    plan = plan_dedupe(project)
    assert {name for name, _ in plan.errors} == {"broken.png", "truncated.jpg"}
    assert [{m.name for m in c.members} for c in plan.clusters] == [COPIES_OF_A, COPIES_OF_B]
    assert plan.image_count == 11


def test_missing_hash_package_is_one_clear_error_not_every_file_unreadable(project, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pywt" else real(name, *a))
    with pytest.raises(UserError, match="whash needs the PyWavelets package"):
        plan_dedupe(project, "whash")


def test_process_pool_gives_the_same_hashes(project):
    paths = sorted(project.dataset.glob("*.*g"))
    single, pooled = hash_images(paths, workers=1), hash_images(paths, workers=2)
    assert [i.path for i in single.infos] == [i.path for i in pooled.infos] == paths
    assert np.array_equal(single.hashes, pooled.hashes)


def brute_force_pairs(hashes, threshold):
    found = set()
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            d = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(hashes[i], hashes[j]))
            if d <= threshold:
                found.add((i, j, d))
    return found


@pytest.mark.parametrize("words", [1, 4])
def test_vectorised_pairs_equal_brute_force(words):
    rng = np.random.default_rng(words)
    hashes = rng.integers(0, 2**64, size=(150, words), dtype=np.uint64)
    # Plant close neighbours: copies of earlier rows with a few bits flipped.
    for row in range(100, 150):
        hashes[row] = hashes[rng.integers(0, 100)]
        for _ in range(int(rng.integers(0, 12))):
            word, bit = rng.integers(0, words), rng.integers(0, 64)
            hashes[row, word] ^= np.uint64(1) << np.uint64(bit)
    for threshold in (0, 5, 10):
        expected = brute_force_pairs(hashes, threshold)
        assert {tuple(int(v) for v in row) for row in find_pairs(hashes, threshold, block=7)} == expected
    assert len(expected) > 30


def test_cluster_joins_chains_and_skips_singletons():
    assert cluster(8, [(0, 1, 3), (1, 2, 4), (6, 5, 0)]) == [[0, 1, 2], [5, 6]]
    assert cluster(3, np.zeros((0, 3), np.int64)) == []


def test_cli_dry_run_then_apply_then_undo(project, capsys):
    root = str(project.root)
    before = tree(project.dataset)
    assert main(["dedupe", "kat", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "2 clusters" in out and "* a.png" in out and "Dry run, nothing moved" in out
    assert tree(project.dataset) == before
    assert main(["dedupe", "kat", "--root", root, "--apply", "--keep", "2=b_q60.jpg", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["clusters"][1]["remove"] == ["b_q60.jpg"]  # the plan's own choice…
    assert (project.dataset / "b_q60.jpg").is_file() and not (project.dataset / "b.png").exists()  # …overridden
    assert main(["undo", "kat", "--root", root]) == 0
    assert data["batch"]["id"] in capsys.readouterr().out
    assert tree(project.dataset) == before


def test_cli_on_an_empty_dataset_finds_nothing(tmp_path, capsys):
    create_project(tmp_path, "empty")
    assert main(["dedupe", "empty", "--root", str(tmp_path), "--apply"]) == 0
    assert "No near-duplicates among 0 images" in capsys.readouterr().out
    assert list((tmp_path / "empty" / "_removed").iterdir()) == []


def test_cli_reports_bad_keep_and_unreadable_files(project, capsys):
    root = str(project.root)
    assert main(["dedupe", "kat", "--root", root, "--keep", "a.png"]) == 2
    assert "should look like 3=photo_01.png" in capsys.readouterr().err
    (project.dataset / "broken.png").write_bytes(b"nope")
    assert main(["dedupe", "kat", "--root", root]) == 1
    assert "could not read broken.png" in capsys.readouterr().out


def test_bench_caches_generated_images(tmp_path, capsys):
    args = ["bench", "dedupe", "--images", "20", "--workers", "2", "--reference", "5", "--cache", str(tmp_path), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["generated"] == 20 and first["unreadable"] == 0 and first["clusters_found"] == 2
    assert "recall" in first["photos"] or "scikit-image" in first["photos"]["skipped"]
    assert len(list(tmp_path.rglob("*.jpg"))) == 20
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 0


def test_calibration_default_phash_threshold_separates_copies_from_distinct():
    report = calibrate(sources=4, workers=1)["methods"]["phash"]
    t = report["default_threshold"]
    assert report["copies"]["pairs"] == 4 * 5 and report["unrelated"]["pairs"] == 6 * 10 * 10
    assert report["copies"]["by_threshold"][t] == 0
    assert report["same_background"]["by_threshold"][t] == report["unrelated"]["by_threshold"][t] == 0

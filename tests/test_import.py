from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from badimages import BLUE, OUTSIDE_SUFFIX, RED, encode, make_bad_corpus, make_odd_but_valid
from lorakit_ext.cli import main
from lorakit_ext.dataset.importer import import_files, import_folder, sanitize_filename
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project


@pytest.fixture
def project(tmp_path):
    return create_project(tmp_path / "projects", "kat")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file hashes and symlink targets, without following links."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def dataset_files(project) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in project.dataset.iterdir()}


def write_image(path: Path, colour=None, fmt="PNG", size=(8, 8)) -> bytes:
    """An image file; without ``colour``, one picked from the path, so two test images never have
    the same content by accident (the importer skips content the dataset already holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        colour = tuple(hashlib.sha256(str(path).encode()).digest()[:3])
    data = encode(Image.new("RGB", size, colour), fmt)
    path.write_bytes(data)
    return data


def opened(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(path.read_bytes()))


def by_name(report) -> dict:
    return {Path(f.source).name: f for f in report.imported}


def test_bad_files_are_rejected_with_their_reason_and_source_untouched(project, tmp_path):
    src = tmp_path / "src"
    expected = make_bad_corpus(src)
    good = write_image(src / "good.png")
    outside = tmp_path / f"src{OUTSIDE_SUFFIX}"
    before = snapshot(src), snapshot(outside)

    report = import_folder(project, src)

    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert set(reasons) == set(expected)
    for name, part in expected.items():
        assert part in reasons[name], name
    assert dataset_files(project) == {"good.png": good}
    assert (snapshot(src), snapshot(outside)) == before
    assert "secret.png" in before[1]


def test_small_max_pixels_rejects_naming_size_and_limit(project, tmp_path):
    write_image(tmp_path / "src" / "big.png", size=(100, 50))
    write_image(tmp_path / "src" / "small.png", size=(10, 10))

    report = import_folder(project, tmp_path / "src", max_pixels=4000)

    assert [f.dest.name for f in report.imported] == ["small.png"]
    assert "100×50 = 0.005 MP, over the limit of 0.004 MP" in report.rejected[0].reason


def test_odd_but_valid_images_are_normalised(project, tmp_path):
    src = tmp_path / "src"
    names = make_odd_but_valid(src)
    before = snapshot(src)

    report = import_folder(project, src)
    # The CMYK red square converts to the very PNG that the GIF's red first frame became.
    [duplicate] = report.skipped
    assert (Path(duplicate.source).name, duplicate.duplicate_of) == ("cmyk.jpg", "animated.png")
    report.imported += import_files(create_project(tmp_path / "other", "cmyk"), [src / "cmyk.jpg"]).imported

    assert not report.rejected
    imported = by_name(report)
    assert set(imported) == set(names)
    for name in ("café photo ü.png", "plain.jpg", "grey.png", "photo.webp", "phone.jpg"):
        assert imported[name].converted_reason is None
        assert imported[name].dest.name == name
        assert imported[name].dest.read_bytes() == (src / name).read_bytes()
    for name in ("cmyk.jpg", "gray16.png", "palette_alpha.png", "rgba.png", "rotated.jpg", "animated.gif", "picture.bmp"):
        dest = imported[name].dest
        assert dest.name == Path(name).stem + ".png"
        assert opened(dest).mode == "RGB"
    assert "CMYK" in imported["cmyk.jpg"].converted_reason
    assert "16-bit" in imported["gray16.png"].converted_reason
    assert "transparency" in imported["rgba.png"].converted_reason
    assert "orientation 6" in imported["rotated.jpg"].converted_reason
    assert "GIF" in imported["animated.gif"].converted_reason
    assert "BMP" in imported["picture.bmp"].converted_reason

    def pixels(name):
        return opened(imported[name].dest)

    # 16-bit values are scaled, not clipped: 65535 → 255, 1000 → 4, 257 → 1.
    assert [pixels("gray16.png").getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (255,) * 3, (4,) * 3, (1,) * 3]
    upright = pixels("rotated.jpg")
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((10, 5))
    assert r > 200 and b < 60
    r, g, b = upright.getpixel((10, 35))
    assert b > 200 and r < 60
    assert pixels("palette_alpha.png").getpixel((0, 0)) == (255, 255, 255)
    assert pixels("palette_alpha.png").getpixel((1, 1)) == RED
    assert pixels("rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert pixels("rgba.png").getpixel((1, 1)) == BLUE
    assert pixels("animated.gif").getpixel((0, 0)) == RED
    assert pixels("picture.bmp").getpixel((0, 0)) == BLUE
    r, g, b = pixels("cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    assert snapshot(src) == before


def test_second_import_adds_suffixes_and_overwrites_nothing(project, tmp_path):
    src = tmp_path / "src"
    first = write_image(src / "a.png", RED)
    (src / "a.txt").write_bytes("kat, red".encode())
    import_folder(project, src)
    after_first = dataset_files(project)

    write_image(src / "a.png", BLUE)
    (src / "a.txt").write_bytes("kat, blue".encode())
    report = import_folder(project, src)

    files = dataset_files(project)
    assert {name: files[name] for name in after_first} == after_first
    assert files["a.png"] == first
    assert files["a_1.png"] == (src / "a.png").read_bytes()
    assert files["a_1.txt"] == b"kat, blue"
    assert report.imported[0].renamed_from == "a.png"
    assert [c.name for c in report.imported[0].captions] == ["a_1.txt"]


def test_captions_come_along_byte_for_byte_and_a_stray_caption_is_never_adopted(project, tmp_path):
    src = tmp_path / "src"
    write_image(src / "b.bmp", fmt="BMP")
    caption = "café, ü\r\n".encode("utf-8")
    (src / "b.txt").write_bytes(caption)
    (src / "b.caption").write_bytes(b"kohya caption")
    (project.dataset / "b.txt").write_bytes(b"someone else's caption")

    report = import_folder(project, src)

    files = dataset_files(project)
    assert files["b.txt"] == b"someone else's caption"
    assert files["b_1.txt"] == caption
    assert files["b_1.caption"] == b"kohya caption"
    assert "b_1.png" in files
    assert sorted(c.name for c in report.imported[0].captions) == ["b_1.caption", "b_1.txt"]


def test_same_stem_in_one_folder_is_rejected_but_in_two_folders_renamed(project, tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg", fmt="JPEG")
    write_image(src / "a.png")
    (src / "a.txt").write_bytes(b"one caption for two images")
    write_image(src / "one" / "x.png", RED)
    (src / "one" / "x.txt").write_bytes(b"first x")
    write_image(src / "two" / "x.png", BLUE)
    (src / "two" / "x.txt").write_bytes(b"second x")

    report = import_folder(project, src, recursive=True)

    [rejected] = report.rejected
    assert rejected.source == str(src / "a.png")
    assert "same name as a.jpg in the same folder" in rejected.reason
    files = dataset_files(project)
    assert sorted(files) == ["a.jpg", "a.txt", "x.png", "x.txt", "x_1.png", "x_1.txt"]
    assert files["x.txt"] == b"first x" and files["x_1.txt"] == b"second x"
    renamed = {f.dest.name: f.renamed_from for f in report.imported}
    assert renamed["x.png"] is None and renamed["x_1.png"] == "x.png"


def test_caption_symlink_escaping_the_source_rejects_its_image(project, tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png")
    (tmp_path / "private.txt").write_bytes(b"not for the dataset")
    os.symlink(tmp_path / "private.txt", src / "a.txt")
    write_image(src / "b.png")

    report = import_folder(project, src)

    assert "its caption a.txt is a symlink pointing outside the source folder" in report.rejected[0].reason
    assert sorted(dataset_files(project)) == ["b.png"]


def test_same_stem_after_a_rejected_file_is_imported(project, tmp_path):
    src = tmp_path / "src"
    (src).mkdir()
    (src / "a.jpg").write_bytes(b"")
    write_image(src / "a.png")

    report = import_folder(project, src)

    assert [f.dest.name for f in report.imported] == ["a.png"]
    assert "empty file" in report.rejected[0].reason


def test_subfolders_only_with_recursive_and_hidden_folders_skipped(project, tmp_path):
    src = tmp_path / "src"
    write_image(src / "top.png")
    write_image(src / "sub" / "deep.png")
    write_image(src / ".thumbnails" / "thumb.png")

    assert [f.dest.name for f in import_folder(project, src).imported] == ["top.png"]
    recursive = import_folder(project, src, recursive=True)
    assert [f.dest.name for f in recursive.imported] == ["deep.png"]
    assert [(Path(k.source).name, k.duplicate_of) for k in recursive.skipped] == [("top.png", "top.png")]
    assert sorted(dataset_files(project)) == ["deep.png", "top.png"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda src: src.mkdir(), "is empty"),
        (lambda src: (src.mkdir(), (src / "notes.md").write_text("x")), "no images"),
        (lambda src: write_image(src / "sub" / "a.png"), "import recursively to include sub-folders"),
        (lambda src: None, "does not exist"),
    ],
)
def test_nothing_to_import_is_a_user_error(project, tmp_path, setup, message):
    setup(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        import_folder(project, tmp_path / "src")
    assert dataset_files(project) == {}


def test_the_projects_own_dataset_cannot_be_the_source(project):
    write_image(project.dataset / "a.png")
    with pytest.raises(UserError, match="this project's dataset folder"):
        import_folder(project, project.dataset)
    with pytest.raises(UserError, match="contains this project's folder"):
        import_folder(project, project.root, recursive=True)
    assert dataset_files(project) == {"a.png": (project.dataset / "a.png").read_bytes()}


def test_uploads_use_sanitized_original_names_and_pair_captions(project, tmp_path):
    tmp = tmp_path / "gradio"
    uploads = {
        "tmp1abc.png": "../../evil.png",
        "tmp2def": "café photo ü.png",
        "tmp3ghi": "café photo ü.txt",
        "tmp4jkl": "lonely.txt",
        "tmp5mno": "notes.pdf",
        "tmp6pqr": "Holiday.JPEG",
    }
    holiday = write_image(tmp / "tmp6pqr", fmt="JPEG")
    write_image(tmp / "tmp1abc.png")
    write_image(tmp / "tmp2def")
    (tmp / "tmp3ghi").write_bytes("ü caption".encode())
    (tmp / "tmp4jkl").write_bytes(b"no image")
    (tmp / "tmp5mno").write_bytes(b"%PDF")

    report = import_files(project, [tmp / n for n in uploads], original_names=list(uploads.values()))

    files = dataset_files(project)
    assert sorted(files) == ["Holiday.jpeg", "café photo ü.png", "café photo ü.txt", "evil.png"]
    assert files["Holiday.jpeg"] == holiday
    assert files["café photo ü.txt"] == "ü caption".encode()
    assert not (tmp_path / "evil.png").exists() and not (project.root / "evil.png").exists()
    reasons = {r.source: r.reason for r in report.rejected}
    assert "no image of the same name" in reasons["lonely.txt"]
    assert "not an image file type (.pdf)" in reasons["notes.pdf"]
    assert sorted(uploads) == sorted(p.name for p in tmp.iterdir())


def test_explicit_files_bring_their_sidecars_and_refuse_dataset_files(project, tmp_path):
    write_image(tmp_path / "p.png")
    (tmp_path / "p.txt").write_bytes(b"p caption")
    write_image(project.dataset / "q.png")

    report = import_files(project, [tmp_path / "p.png", project.dataset / "q.png"])

    assert dataset_files(project)["p.txt"] == b"p caption"
    assert [r.reason for r in report.rejected] == ["already in this project's dataset"]
    assert sorted(dataset_files(project)) == ["p.png", "p.txt", "q.png"]


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("../../x.png", "x.png"),
        ("C:\\Users\\me\\y.jpg", "y.jpg"),
        ("café photo ü.png", "café photo ü.png"),
        ("new\nline\x07.png", "new_line_.png"),
        ("a:b*c?.png", "a_b_c_.png"),
        ("evil\u202egnp.exe", "evil_gnp.exe"),
        (".png", "image.png"),
        ("..", "image"),
        (" .hidden.png ", "hidden.png"),
    ],
)
def test_sanitize_filename(raw, clean):
    assert sanitize_filename(raw) == clean


def test_cli_import_happy_path_and_json(project, tmp_path, capsys):
    src = tmp_path / "src"
    write_image(src / "one.png")
    (src / "one.txt").write_bytes(b"kat")
    write_image(src / "two.bmp", fmt="BMP")
    (src / "broken.jpg").write_bytes(b"")
    root = str(project.root)

    assert main(["import", "kat", str(src), "--root", root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "imported 2, rejected 1 (1 converted to PNG, 0 renamed, 1 caption files)"
    assert out[1] == f"rejected {src / 'broken.jpg'}: empty file (0 bytes)"
    assert out[2] == f"saved to {project.dataset}"
    assert f"converted {src / 'two.bmp'} -> two.png: BMP stored as PNG" in out

    write_image(src / "three.png")
    assert main(["import", "kat", str(src / "one.png"), str(src / "three.png"), "--root", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["rejected"] == []
    [entry] = data["imported"]
    assert entry["dest"] == str(project.dataset / "three.png") and entry["renamed_from"] is None
    assert data["skipped"] == [
        {"source": str(src / "one.png"), "reason": "already in the dataset as one.png (same content)", "duplicate_of": "one.png"}
    ]


def test_cli_errors_are_one_line(project, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.png").write_bytes(b"not a png")
    root = str(project.root)

    assert main(["import", "nope", str(src), "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: no project 'nope'") and "project create nope" in err

    assert main(["import", "kat", str(src), "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 1 files could be imported" in err and "broken.png" in err

    assert main(["import", "kat", str(tmp_path / "missing"), "--root", root, "--json"]) == 2
    assert "does not exist" in json.loads(capsys.readouterr().out)["error"]
    assert main(["import", "kat", str(src), "--root", root, "--max-megapixels", "0"]) == 2
    assert "--max-megapixels must be a number above 0" in capsys.readouterr().err
    assert dataset_files(project) == {}


def test_importing_a_folder_again_skips_every_file_already_there(project, tmp_path, capsys):
    src = tmp_path / "src"
    write_image(src / "a.png")
    (src / "a.txt").write_bytes(b"kat, smile")
    write_image(src / "b.jpg", fmt="JPEG")
    write_image(src / "c.bmp", fmt="BMP")
    root = str(project.root)
    assert main(["import", "kat", str(src), "--root", root]) == 0
    capsys.readouterr()
    after_first = dataset_files(project)
    (src / "a.txt").write_bytes(b"kat, smile, edited in the source")
    write_image(src / "d.png")

    assert main(["import", "kat", str(src), "--root", root]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "imported 1, rejected 0, skipped 3 (0 converted to PNG, 0 renamed, 0 caption files)"
    assert f"skipped {src / 'b.jpg'}: already in the dataset as b.jpg (same content)" in out
    assert f"skipped {src / 'c.bmp'}: already in the dataset as c.png (same content)" in out
    assert (
        f"skipped {src / 'a.png'}: already in the dataset as a.png (same content); "
        "its caption a.txt differs from a.txt there and was not copied"
    ) in out
    assert dataset_files(project) == {**after_first, "d.png": (src / "d.png").read_bytes()}

    assert main(["import", "kat", str(src), "--root", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["imported"] == [] and data["rejected"] == []
    assert sorted(k["duplicate_of"] for k in data["skipped"]) == ["a.png", "b.jpg", "c.png", "d.png"]


def test_identical_files_in_one_import_come_in_once(project, tmp_path):
    src = tmp_path / "src"
    data = write_image(src / "one" / "x.png", RED)
    write_image(src / "two" / "y.png", RED)

    report = import_folder(project, src, recursive=True)

    assert dataset_files(project) == {"x.png": data}
    [skipped] = report.skipped
    assert skipped.source == str(src / "two" / "y.png") and skipped.reason.startswith("already in the dataset as x.png")


def test_a_symlinked_subfolder_is_not_followed_and_the_report_says_so(project, tmp_path, capsys):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_image(src / "sub" / "inside.png")
    write_image(elsewhere / "outside.png")
    os.symlink(elsewhere, src / "linked")
    os.symlink(src, src / "sub" / "loop")

    report = import_folder(project, src, recursive=True)

    assert sorted(dataset_files(project)) == ["inside.png"]
    reasons = {Path(k.source).name: k.reason for k in report.skipped}
    assert set(reasons) == {"linked", "loop"}
    assert reasons["linked"].startswith(f"a symbolic link to the folder {elsewhere.resolve()}, not followed")
    assert report.to_dict()["skipped"][0]["source"] == str(src / "linked")

    assert main(["import", "kat", str(src), "--recursive", "--root", str(project.root)]) == 0
    assert f"skipped {src / 'linked'}: a symbolic link to the folder {elsewhere.resolve()}" in capsys.readouterr().out


def test_only_linked_subfolders_is_an_error_that_names_them(project, tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_image(elsewhere / "outside.png")
    src.mkdir()
    os.symlink(elsewhere, src / "linked")
    with pytest.raises(UserError, match=f"no images .* found in {src}; {src / 'linked'}: a symbolic link"):
        import_folder(project, src, recursive=True)


def test_same_stem_without_a_caption_imports_both_under_distinct_stems(project, tmp_path):
    src = tmp_path / "src"
    jpg = write_image(src / "x.jpg", fmt="JPEG")
    png = write_image(src / "x.png")

    report = import_folder(project, src)

    assert report.rejected == []
    assert dataset_files(project) == {"x.jpg": jpg, "x_1.png": png}
    assert by_name(report)["x.png"].renamed_from == "x.png"

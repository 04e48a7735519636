from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from PIL import Image

from lorakit_ext.compare import promote as promote_module
from lorakit_ext.compare.promote import promote
from lorakit_ext.dataset.trash import move_to_removed, undo
from lorakit_ext.errors import UserError
from lorakit_ext.export.card import card_json, next_gen_name, sd_version_of, with_output_name
from lorakit_ext.export.writer import ModuleWeights, epoch_file_name, read_lora_file, tensor_bytes, write_lora_file
from lorakit_ext.project import create_project

META = {
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_epoch": "2",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "kat-02",
}


def modules(seed: int) -> list[ModuleWeights]:
    g = torch.Generator().manual_seed(seed)
    return [
        ModuleWeights("lora_unet_down_blocks_0_attentions_0_proj_in", torch.randn(4, 8, 1, 1, generator=g), torch.randn(8, 4, 1, 1, generator=g), 2.0),
        ModuleWeights("lora_te_text_model_encoder_layers_0_self_attn_q_proj", torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 4.0),
    ]


@pytest.fixture
def setup(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    files = []
    for epoch in (1, 2, 3):
        path = lora_dir / epoch_file_name("kat", epoch)
        write_lora_file(path, modules(epoch), {**META, "ss_epoch": str(epoch)})
        files.append(path)
    return project, lora_dir, files


def tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- card.py -----------------------------------------------------------------------------------
def test_next_gen_name_starts_at_zero_and_never_refills_gaps():
    assert next_gen_name([], "kat") == "kat-gen0"
    assert next_gen_name(["kat-01.safetensors", "kat-gen0.safetensors"], "kat") == "kat-gen1"
    # gen1 was removed: its number stays used, the next one goes above the highest.
    assert next_gen_name(["kat-gen0.safetensors", "kat-gen2.safetensors"], "kat") == "kat-gen3"


def test_next_gen_name_counts_sidecars_and_ignores_lookalikes():
    assert next_gen_name(["kat-gen4.preview.png"], "kat") == "kat-gen5"
    assert next_gen_name(["KAT-GEN6.json"], "kat") == "kat-gen7"
    lookalikes = ["kat-gen01.safetensors", "kat-gen2x.safetensors", "katy-gen9.safetensors", "kat-gen.safetensors", "kat-02.safetensors"]
    assert next_gen_name(lookalikes, "kat") == "kat-gen0"


def test_card_json_has_a1111_keys():
    card = card_json("  kat3r1na ", 0.8, "SD1", "my character", notes="epoch 2")
    assert card == {
        "description": "my character",
        "sd version": "SD1",
        "activation text": "kat3r1na",
        "preferred weight": 0.8,
        "negative text": "",
        "notes": "epoch 2",
    }
    with pytest.raises(UserError, match="sd version"):
        card_json("t", 1.0, "sd1", "")
    with pytest.raises(UserError, match="preferred weight"):
        card_json("t", 2.5, "SD1", "")


def test_sd_version_of_follows_a1111():
    assert sd_version_of({"ss_base_model_version": "sdxl_base_v1-0"}) == "SDXL"
    assert sd_version_of({"ss_v2": "True"}) == "SD2"
    assert sd_version_of({"ss_v2": "False"}) == "SD1"
    assert sd_version_of({}) == "Unknown"


def test_with_output_name_renames_and_drops_hashes():
    meta = {"ss_output_name": "kat-02", "modelspec.title": "kat-02", "sshs_model_hash": "x", "sshs_legacy_hash": "y", "ss_epoch": "2"}
    out = with_output_name(meta, "kat-gen0")
    assert out == {"ss_output_name": "kat-gen0", "modelspec.title": "kat-gen0", "ss_epoch": "2"}
    assert meta["ss_output_name"] == "kat-02"  # input untouched
    assert "modelspec.title" not in with_output_name({"ss_epoch": "1"}, "s")


# ---- promote -----------------------------------------------------------------------------------
def test_promote_copies_tensors_with_new_name_card_and_preview(setup):
    project, lora_dir, files = setup
    before = files[1].read_bytes()
    preview = Image.new("RGB", (8, 6), (10, 200, 30))
    result = promote(project, lora_dir, files[1], trigger="kat3r1na", preferred_weight=0.9, description="best", preview=preview)

    assert result.path == lora_dir.resolve() / "kat-gen0.safetensors"
    assert files[1].read_bytes() == before
    tensors, meta = read_lora_file(result.path)
    old_tensors, old_meta = read_lora_file(files[1])
    assert tensors.keys() == old_tensors.keys() and all(torch.equal(tensors[k], old_tensors[k]) for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert meta["ss_output_name"] == "kat-gen0" and meta["modelspec.title"] == "kat-gen0" and meta["ss_epoch"] == "2"
    data = result.path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(tensor_bytes(data)).hexdigest() == old_meta["sshs_model_hash"]
    # The legacy hash covers the ss_* metadata's serialisation, so it is the writer's for the new name.
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert meta["sshs_legacy_hash"] == hashlib.sha256(safetensors.torch.save(tensors, ss_only)[0x100000:0x110000]).hexdigest()[:8]

    card = json.loads(result.card_path.read_text(encoding="utf-8"))
    assert result.card_path.name == "kat-gen0.json"
    assert card["activation text"] == "kat3r1na" and card["preferred weight"] == 0.9 and card["sd version"] == "SD1"
    assert card["description"] == "best"
    assert result.preview_path.name == "kat-gen0.preview.png"
    with Image.open(result.preview_path) as png:
        assert png.format == "PNG" and png.tobytes() == preview.tobytes()
    assert result.removed_batch is None
    assert not [p for p in lora_dir.iterdir() if p.name.startswith(".") or p.suffix == ".txt"]


def test_promote_never_overwrites(setup):
    project, lora_dir, files = setup
    first = promote(project, lora_dir, files[0], trigger="t")
    assert first.preview_path is None and not (lora_dir / "kat-gen0.preview.png").exists()
    (lora_dir / "kat-gen1.preview.png").write_bytes(b"a user's picture")
    second = promote(project, lora_dir, files[2], trigger="t")
    assert second.path.name == "kat-gen2.safetensors"
    assert (lora_dir / "kat-gen1.preview.png").read_bytes() == b"a user's picture"
    assert read_lora_file(first.path)[1]["ss_epoch"] == "1"


def test_a_name_taken_while_promoting_leaves_everything_as_it_was(setup, monkeypatch):
    project, lora_dir, files = setup
    promote(project, lora_dir, files[0], trigger="t").card_path.unlink()
    before = tree(lora_dir)
    # Another writer took the name between choosing it and publishing: the card and preview go in
    # first (their names are free here), the LoRA's is taken, and both are taken out again.
    monkeypatch.setattr(promote_module, "next_gen_name", lambda names, output_name: "kat-gen0")
    with pytest.raises(UserError, match="nothing was promoted"):
        promote(project, lora_dir, files[1], trigger="other", preview=Image.new("RGB", (4, 4)))
    assert tree(lora_dir) == before
    assert [p.name for p in lora_dir.iterdir() if p.is_dir()] == []


def test_names_that_went_to_removed_are_not_reused(setup):
    project, lora_dir, files = setup
    gen0 = promote(project, lora_dir, files[0], trigger="t")
    move_to_removed(project, [gen0.path, gen0.card_path], "user removed it", allowed_bases=(lora_dir,))
    assert promote(project, lora_dir, files[1], trigger="t").path.name == "kat-gen1.safetensors"
    undo(project, allowed_bases=(lora_dir,))
    assert gen0.path.is_file()


def test_remove_other_epochs_goes_to_removed_and_undo_restores(setup):
    project, lora_dir, files = setup
    (lora_dir / "kat-01.json").write_text("{}", encoding="utf-8")
    (lora_dir / "other-01.safetensors").write_bytes(b"not ours")
    originals = {p.name: p.read_bytes() for p in [*files, lora_dir / "kat-01.json"]}
    gone = [files[0], files[2]]
    result = promote(project, lora_dir, files[1], trigger="t", remove_other_epochs=True, run_files=[*files, lora_dir / "kat-04.safetensors"])

    assert not any(p.exists() for p in gone) and not (lora_dir / "kat-01.json").exists()
    assert files[1].is_file() and result.path.is_file() and (lora_dir / "other-01.safetensors").is_file()
    batch = result.removed_batch
    assert sorted(f.stored_name for f in batch.files) == ["kat-01.json", "kat-01.safetensors", "kat-03.safetensors"]
    assert batch.folder.parent == project.removed and batch.extra["promoted"] == "kat-gen0.safetensors"

    undo(project, allowed_bases=(lora_dir,))
    assert {name: (lora_dir / name).read_bytes() for name in originals} == originals


def test_without_the_flag_run_files_stay(setup):
    project, lora_dir, files = setup
    result = promote(project, lora_dir, files[1], trigger="t", run_files=files)
    assert result.removed_batch is None and all(p.is_file() for p in files)


def test_paths_outside_the_lora_folder_are_refused(setup, tmp_path):
    project, lora_dir, files = setup
    outside = tmp_path / "kat-05.safetensors"
    write_lora_file(outside, modules(5), META)
    with pytest.raises(UserError, match="outside"):
        promote(project, lora_dir, lora_dir / ".." / "kat-05.safetensors", trigger="t")
    (lora_dir / "kat-06.safetensors").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        promote(project, lora_dir, lora_dir / "kat-06.safetensors", trigger="t")
    (lora_dir / "other-01.safetensors").write_bytes(b"another LoRA")
    before = tree(lora_dir)
    with pytest.raises(UserError, match="outside"):
        promote(project, lora_dir, files[0], trigger="t", remove_other_epochs=True, run_files=[lora_dir / ".." / "kat-05.safetensors"])
    with pytest.raises(UserError, match="not an epoch file of kat"):
        promote(project, lora_dir, files[0], trigger="t", remove_other_epochs=True, run_files=[lora_dir / "other-01.safetensors"])
    # Checked before anything was written or moved.
    assert tree(lora_dir) == before and outside.is_file()


def test_refuses_what_it_cannot_copy_exactly(setup):
    project, lora_dir, files = setup
    gen = promote(project, lora_dir, files[0], trigger="t")
    with pytest.raises(UserError, match="not an epoch file"):
        promote(project, lora_dir, gen.path, trigger="t")
    with pytest.raises(UserError, match="SD1 LoRA by its metadata"):
        promote(project, lora_dir, files[0], trigger="t", sd_version="SDXL")
    fp32 = lora_dir / "fp32-01.safetensors"
    tensors = {k: v.float() for k, v in read_lora_file(files[0])[0].items()}
    safetensors.torch.save_file(tensors, str(fp32), metadata=META)
    with pytest.raises(UserError, match="float32"):
        promote(project, lora_dir, fp32, trigger="t")
    odd = lora_dir / "odd-01.safetensors"
    safetensors.torch.save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2, dtype=torch.float16)}, str(odd), metadata=META)
    with pytest.raises(UserError, match="modules without a 0-d alpha, such as lora_unet_x"):
        promote(project, lora_dir, odd, trigger="t")
    assert not list(lora_dir.glob("fp32-gen*")) and not list(lora_dir.glob("odd-gen*"))


def test_a_loha_epoch_is_copied_bit_for_bit(setup):
    project, lora_dir, _ = setup
    loha = lora_dir / "hada-01.safetensors"
    torch.manual_seed(0)
    tensors = {f"lora_unet_x.{part}": torch.randn(4, 2).half() for part in ("hada_w1_a", "hada_w2_a")}
    tensors.update({f"lora_unet_x.{part}": torch.randn(2, 4).half() for part in ("hada_w1_b", "hada_w2_b")})
    tensors["lora_unet_x.alpha"] = torch.tensor(2.0).half()
    safetensors.torch.save_file(tensors, str(loha), metadata=META)
    copied, _ = read_lora_file(promote(project, lora_dir, loha, trigger="t").path)
    assert copied.keys() == tensors.keys() and all(torch.equal(copied[k], tensors[k]) for k in tensors)

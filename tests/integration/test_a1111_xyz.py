"""Epoch grids through the real A1111's X/Y/Z plot, in-process (see a1111_inprocess.py for how to run)."""

from __future__ import annotations

import shutil

import pytest
from a1111_inprocess import skip_reason, start

from lorakit_ext.errors import UserError

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

PROMPT = "a photo of a cat"
RENDER = {"steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0, "sampler_name": "Euler"}
NAMES = ["lkxyz-01", "lkxyz-02"]


# conftest.py's autouse session fixtures drive a WebUI over HTTP (LORAKIT_A1111_URL) and skip
# without one; this module starts A1111 in-process instead, so it replaces them with no-ops.
@pytest.fixture(scope="session")
def new_log_lines():
    return lambda: None


@pytest.fixture(scope="session")
def small_grids():
    return None


@pytest.fixture(scope="module")
def webui():
    webui = start()
    for seed, name in enumerate(NAMES, start=1):
        webui.write_lora(name, seed)
    return webui


@pytest.fixture(scope="module")
def xyz(webui):
    from lorakit_ext.webui import xyz

    return xyz


def same(a, b) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def render(webui, prompt, seed):
    return webui.txt2img(prompt, seed=seed, **RENDER)


def test_the_test_lora_has_kohyas_sd15_layout(webui):
    from lorakit_ext.export.writer import read_lora_file

    tensors, _ = read_lora_file(webui.lora_dir / "lkxyz-01.safetensors")
    modules = {key.split(".")[0] for key in tensors}
    assert sum(m.startswith("lora_unet_") for m in modules) == 192
    assert sum(m.startswith("lora_te_") for m in modules) == 6 * len(webui.shared.sd_model.cond_stage_model.wrapped.transformer.text_model.encoder.layers)


def test_grid_cells_are_the_single_renders(webui, xyz):
    result = xyz.run_epoch_grid(NAMES, prompt=f"{PROMPT} <lora:lkxyz-01:1>", seeds=[11, 12], **RENDER)

    assert result.column_labels == ["no LoRA", *NAMES] and result.row_labels == ["seed 11", "seed 12"]
    assert sorted(result.cells) == sorted((label, seed, 1.0) for label in result.column_labels for seed in (11, 12))
    for seed in (11, 12):
        base = render(webui, PROMPT, seed)
        assert same(result.cells[("no LoRA", seed, 1.0)], base)
        for name in NAMES:
            single = render(webui, f"{PROMPT} <lora:{name}:1>", seed)
            assert same(result.cells[(name, seed, 1.0)], single)
            assert not same(single, base)  # the LoRA does change the picture
    grids = (webui.webui / webui.shared.opts.outdir_txt2img_grids).resolve()
    assert result.path.is_file() and grids in result.path.parents and result.path.name.startswith("xyz_grid")
    from PIL import Image

    with Image.open(result.path) as saved:
        assert saved.size == result.image.size
    # Three 64-pixel columns and two rows, plus the legend's margins.
    assert result.image.width >= 3 * 64 and result.image.height >= 2 * 64


def test_weight_axis_and_a_baseline_that_ignores_it(webui, xyz):
    result = xyz.run_epoch_grid(["lkxyz-01"], prompt=PROMPT, seeds=[11], weights=[1.0, 0.5], **RENDER)

    assert len(result.cells) == 4
    base = render(webui, PROMPT, 11)
    assert same(result.cells[("no LoRA", 11, 1.0)], base) and same(result.cells[("no LoRA", 11, 0.5)], base)
    half = render(webui, f"{PROMPT} <lora:lkxyz-01:0.5>", 11)
    assert same(result.cells[("lkxyz-01", 11, 0.5)], half)
    assert same(result.cells[("lkxyz-01", 11, 1.0)], render(webui, f"{PROMPT} <lora:lkxyz-01:1>", 11))
    assert not same(half, result.cells[("lkxyz-01", 11, 1.0)])


def test_an_epoch_file_rewritten_under_its_name_is_rendered_anew(webui, xyz):
    webui.write_lora("lkxyz-05", 5)
    first = xyz.run_epoch_grid(["lkxyz-05"], prompt=PROMPT, seeds=[11], baseline=False, **RENDER)
    webui.write_lora("lkxyz-05", 6)
    second = xyz.run_epoch_grid(["lkxyz-05"], prompt=PROMPT, seeds=[11], baseline=False, **RENDER)
    # The same weights under a name A1111 has never seen: nothing cached can stand in for them.
    webui.write_lora("lkxyz-06", 6)
    fresh = render(webui, f"{PROMPT} <lora:lkxyz-06:1>", 11)
    assert same(second.cells[("lkxyz-05", 11, 1.0)], fresh)
    assert not same(first.cells[("lkxyz-05", 11, 1.0)], fresh)


def test_the_loaded_checkpoint_is_pinned(webui, xyz):
    import safetensors.torch
    from modules import sd_models

    shared = webui.shared
    other = webui.data / "models" / "Stable-diffusion" / "lkxyz-other.safetensors"
    other.parent.mkdir(parents=True, exist_ok=True)
    weights = safetensors.torch.load_file(str(webui.ckpt))
    weights["model.diffusion_model.out.2.weight"] = -weights["model.diffusion_model.out.2.weight"]
    safetensors.torch.save_file(weights, str(other))
    shutil.copy(webui.ckpt.with_suffix(".yaml"), other.with_suffix(".yaml"))
    sd_models.list_models()
    expected = render(webui, f"{PROMPT} <lora:lkxyz-01:1>", 11)
    tiny = shared.opts.sd_model_checkpoint
    # The checkpoint setting now names another file than the one in memory, as after picking it
    # in the list while a job holds the queue.
    shared.opts.data["sd_model_checkpoint"] = sd_models.checkpoint_aliases["lkxyz-other.safetensors"].title
    try:
        result = xyz.run_epoch_grid(["lkxyz-01"], prompt=PROMPT, seeds=[11], baseline=False, **RENDER)
        assert same(result.cells[("lkxyz-01", 11, 1.0)], expected)
        # Without the pin the cell would have come from the other checkpoint: it renders differently.
        assert not same(render(webui, f"{PROMPT} <lora:lkxyz-01:1>", 11), expected)
    finally:
        shared.opts.data["sd_model_checkpoint"] = tiny
        sd_models.reload_model_weights()
    assert shared.sd_model.sd_checkpoint_info.filename == str(webui.ckpt)


def test_grid_is_saved_even_with_grid_saving_off(webui, xyz, tmp_path):
    opts = webui.shared.opts
    opts.data["grid_save"] = False
    try:
        result = xyz.run_epoch_grid(["lkxyz-02"], prompt=PROMPT, seeds=[3], baseline=False, outpath_grids=str(tmp_path), **RENDER)
    finally:
        opts.data["grid_save"] = True
    assert result.path.is_file() and tmp_path in result.path.parents
    assert len(list(tmp_path.rglob("*.png"))) == 1  # only the grid: no cell was saved as a sample


def test_unknown_lora_is_refused_before_rendering(xyz):
    with pytest.raises(UserError, match="lists no LoRA file lkxyz-missing"):
        xyz.run_epoch_grid(["lkxyz-missing"], prompt=PROMPT, seeds=[1], **RENDER)


def test_fill_values_fit_the_live_script(webui, xyz):
    from modules import scripts

    script = next(s for s in scripts.scripts_txt2img.scripts if s.title() == xyz.SCRIPT_TITLE)
    # A1111 loads scripts by path, outside sys.modules: reach the axis list through the class.
    labels = [option.label for option in type(script).run.__globals__["axis_options"]]
    values = xyz.xyz_fill_values(NAMES, [1, 2], [1.0, 0.5])
    assert {values["x_type"], values["y_type"], values["z_type"]} <= set(labels)

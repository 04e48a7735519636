"""Epoch grids drawn by A1111's own "X/Y/Z plot" script, run in-process by a job that holds the queue lock.

The axes:

* X: Prompt S/R over the name inside one ``<lora:NAME:WEIGHT>`` tag, one value per epoch file.
* Y: the seeds.
* Z (optional): Prompt S/R over that tag's WEIGHT, one value per LoRA weight.

The no-LoRA baseline is an X value too: ``NAME:te=0:unet=0``. Its tag still names an epoch file,
but A1111 reads named multipliers after positional ones, so both parts weigh 0 whatever WEIGHT the
Z axis writes behind them; the extension then adds a zero delta to every layer, which leaves the
base weights bit for bit. Rendering the baseline apart and pasting it in would need a second grid
drawn outside A1111 and lose its infotext; a missing or made-up name would make A1111 warn about it
on every cell. Prompt S/R searches for its first value, so that value is what the prompt holds:
the baseline comes first, as in the headless grid.

A1111's ``run`` grew from 15 arguments (1.6, 1.7) to 18 (1.8 to 1.10), so they are passed by name
from the method's signature. Everything above "running it inside A1111" is pure and runs without A1111.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.webui import job_progress
from lorakit_ext.webui.limits import GRID_CFG, GRID_SIZE, GRID_STEPS, LORA_WEIGHT, SEED

SCRIPT_TITLE = "X/Y/Z plot"
AXIS_PROMPT_SR = "Prompt S/R"
AXIS_SEED = "Seed"
AXIS_NOTHING = "Nothing"
BASELINE_LABEL = "no LoRA"
ZERO_WEIGHT_ARGS = "te=0:unet=0"
GRID_BASENAME = "xyz_grid"
# A1111 splits axis values as CSV and a tag at ':' and '>'; a name holding one of these would be cut.
_NOT_IN_NAMES = frozenset(',"<>:\r\n')


@dataclass(frozen=True)
class AxisPlan:
    prompt: str  # holds x_values[0] and, with weights, z_values[0], each exactly once
    x_values: list[str]
    seeds: list[int]
    z_values: list[str]  # empty: no Z axis
    column_labels: list[str]
    weights: list[float]  # [1.0] without a Z axis

    @property
    def cell_count(self) -> int:
        return len(self.x_values) * len(self.seeds) * len(self.weights)


@dataclass(frozen=True)
class GridResult:
    path: Path
    image: object  # PIL.Image.Image: the whole grid as A1111 drew it, legend included
    cells: dict  # (column label, seed, weight) -> PIL.Image.Image; without weights the weight is 1.0
    column_labels: list[str]
    row_labels: list[str]


# ---- the plan (pure) ---------------------------------------------------------------------------
def weight_text(weight: float) -> str:
    """How a weight is written in the tag: always with a decimal point ("1.0", "0.75"), which a
    name like ``kat-01`` does not contain, so a bare weight usually finds only the tag's."""
    text = format(float(weight), ".6g")
    return text if any(c in text for c in ".e") else f"{text}.0"


def _checked_names(lora_names: Sequence[str]) -> list[str]:
    names = list(lora_names)
    if not names:
        raise UserError("name at least one LoRA file for the grid")
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip() or _NOT_IN_NAMES & set(name):
            raise UserError(f"LoRA name {name!r} cannot go into a <lora:…> tag and an X/Y/Z value list; rename the file")
    if len(set(names)) != len(names):
        raise UserError("a LoRA file is named twice in the grid")
    return names


def _checked_seeds(seeds: Sequence[int]) -> list[int]:
    out = [SEED.check(seed, "a grid seed") for seed in seeds]
    if not out:
        raise UserError("give at least one seed for the grid")
    if len(set(out)) != len(out):
        raise UserError("a seed is listed twice for the grid")
    return out


def _checked_weights(weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return []
    out = [float(w) for w in weights]
    if not out:
        raise UserError("give at least one LoRA weight, or none to use 1")
    if not all(math.isfinite(w) for w in out):
        raise UserError(f"LoRA weights {list(weights)} must be finite numbers")
    for weight in out:
        LORA_WEIGHT.check(weight, "a grid's LoRA weight")
    if len({weight_text(w) for w in out}) != len(out):
        raise UserError(f"LoRA weights {list(weights)} repeat a value")
    return out


def _tag_pattern(names: list[str]) -> re.Pattern:
    """Any ``<lora:…>`` tag of one of ``names``, whatever its weights."""
    return re.compile(r"<lora:(?:%s)(?::[^>]*)?>" % "|".join(map(re.escape, names)))


def _place_tag(prompt: str, pattern: re.Pattern, tag: str) -> str:
    """``prompt`` with ``tag`` where its first tag of these files was (other ones dropped), or appended."""
    found = pattern.search(prompt)
    if found is None:
        return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag
    return prompt[: found.start()] + tag + pattern.sub("", prompt[found.end() :])


def _unique_everywhere(term: str, prompt: str, negative: str, x0: str, x_values: list[str]) -> bool:
    # A1111 replaces every occurrence in both prompts, cell by cell, after X's replacement.
    return all(prompt.replace(x0, x).count(term) == 1 and term not in negative.replace(x0, x) for x in x_values)


def plan_axes(
    lora_names: Sequence[str], *, prompt: str, negative: str = "", seeds: Sequence[int],
    weights: Sequence[float] | None = None, baseline: bool = True,
) -> AxisPlan:
    """The prompt and axis values that make A1111's script draw the epoch grid."""
    names = _checked_names(lora_names)
    seed_list = _checked_seeds(seeds)
    weight_list = _checked_weights(weights)
    pattern = _tag_pattern(names)
    if pattern.search(negative):
        raise UserError("the negative prompt holds a <lora:…> tag of these files; take it out")
    x0 = f"{names[0]}:{ZERO_WEIGHT_ARGS}" if baseline else names[0]
    x_values = [x0, *names] if baseline else names
    texts = [weight_text(w) for w in weight_list or [1.0]]
    full = _place_tag(prompt, pattern, f"<lora:{x0}:{texts[0]}>")
    if full.count(x0) != 1 or x0 in negative:
        raise UserError(f"{x0!r} appears in the prompts outside the <lora:…> tag, so X/Y/Z's Prompt S/R would replace it too")
    z_values: list[str] = []
    if weight_list:
        # The bare weight makes the nicer Z labels; the tag's own ":1.0>" when the bare one is not unique.
        for candidate in (texts, [f":{t}>" for t in texts]):
            if _unique_everywhere(candidate[0], full, negative, x0, x_values):
                z_values = candidate
                break
        else:
            raise UserError(f"the prompts hold {texts[0]!r} or ':{texts[0]}>' outside the <lora:…> tag; change them for the weight axis")
    labels = [BASELINE_LABEL, *names] if baseline else names
    return AxisPlan(full, x_values, seed_list, z_values, labels, weight_list or [1.0])


def checked_plan(
    lora_names: Sequence[str], *, prompt: str, negative: str = "", seeds: Sequence[int],
    weights: Sequence[float] | None = None, baseline: bool = True, steps: int, width: int, height: int,
    cfg_scale: float, max_megapixels: float,
) -> AxisPlan:
    """:func:`plan_axes` for a grid whose render settings are within the tab's limits and whose
    image is within A1111's "Maximum image size" (``max_megapixels``), which the X/Y/Z script
    would only enforce once the job runs."""
    GRID_STEPS.check(steps, "the grid's sampling steps")
    GRID_SIZE.check(width, "the grid's image width")
    GRID_SIZE.check(height, "the grid's image height")
    GRID_CFG.check(cfg_scale, "the grid's CFG scale")
    plan = plan_axes(lora_names, prompt=prompt, negative=negative, seeds=seeds, weights=weights, baseline=baseline)
    megapixels = round(plan.cell_count * width * height / 1e6)  # the script's own measure
    if megapixels >= max_megapixels:
        raise UserError(
            f"the grid would be {megapixels} megapixels ({plan.cell_count} images of {width}x{height}); A1111's "
            f"limit is {max_megapixels:g} (Settings > Saving images > Maximum image size): draw fewer epochs, "
            "seeds or weights, or smaller images"
        )
    return plan


def _csv(values) -> str:
    # Values hold no comma or quote (checked above), so A1111's CSV split returns them unchanged.
    return ", ".join(str(v) for v in values)


def xyz_fill_values(
    lora_names: Sequence[str], seeds: Sequence[int], weights: Sequence[float] | None = None, *,
    baseline: bool = True, prompt: str = "", negative: str = "",
) -> dict:
    """What the "fill txt2img's X/Y/Z controls" button puts into txt2img: the script's title, axis
    type labels and value strings, and ``prompt`` (the given txt2img prompt with the tag the X
    values replace). Running it there gives the same grid as :func:`run_epoch_grid`."""
    plan = plan_axes(lora_names, prompt=prompt, negative=negative, seeds=seeds, weights=weights, baseline=baseline)
    return {
        "script": SCRIPT_TITLE,
        "prompt": plan.prompt,
        "x_type": AXIS_PROMPT_SR,
        "x_values": _csv(plan.x_values),
        "y_type": AXIS_SEED,
        "y_values": _csv(plan.seeds),
        "z_type": AXIS_PROMPT_SR if plan.z_values else AXIS_NOTHING,
        "z_values": _csv(plan.z_values),
    }


def script_values(plan: AxisPlan, axis_index: dict[str, int]) -> dict:
    """Every argument any 1.6–1.10 ``run`` takes, by name; ``axis_index`` maps axis labels to the
    indices of the script's axis list (its type dropdowns pass indices)."""
    return {
        "x_type": axis_index[AXIS_PROMPT_SR],
        "x_values": _csv(plan.x_values),
        "x_values_dropdown": [],
        "y_type": axis_index[AXIS_SEED],
        "y_values": _csv(plan.seeds),
        "y_values_dropdown": [],
        "z_type": axis_index[AXIS_PROMPT_SR if plan.z_values else AXIS_NOTHING],
        "z_values": _csv(plan.z_values),
        "z_values_dropdown": [],
        "draw_legend": True,
        "include_lone_images": True,  # the cells come back after the grid: they are the previews
        "include_sub_grids": False,
        "no_fixed_seeds": False,
        "vary_seeds_x": False,
        "vary_seeds_y": False,
        "vary_seeds_z": False,
        "margin_size": 0,
        "csv_mode": False,
    }


def run_kwargs(signature: inspect.Signature, values: dict) -> dict:
    """``values`` cut to the parameters of ``signature`` (``self`` and ``p`` left out); a parameter
    without a default that LoRA Kit has no value for is refused rather than guessed."""
    kwargs = {}
    for name, param in signature.parameters.items():
        if name in ("self", "p") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in values:
            kwargs[name] = values[name]
        elif param.default is param.empty:
            raise UserError(f"this WebUI's X/Y/Z plot takes an argument {name!r} that LoRA Kit does not know (tested with A1111 1.6–1.10)")
    return kwargs


# ---- running it inside A1111 -------------------------------------------------------------------
def _xyz_script():
    from modules import scripts

    for script in scripts.scripts_txt2img.scripts:
        if script.title() == SCRIPT_TITLE:
            return script
    raise UserError(f"A1111's built-in {SCRIPT_TITLE!r} script is not loaded (scripts/xyz_grid.py)")


def _axis_index(script) -> dict[str, int]:
    if getattr(script, "current_axis_options", None) is None:
        # The script builds its axis list in ui(); A1111's own API calls ui() inside a Blocks
        # context the same way when the WebUI was started without building its interface.
        import gradio as gr

        with gr.Blocks():
            script.ui(script.is_img2img)
    labels = [option.label for option in script.current_axis_options]
    missing = [label for label in (AXIS_PROMPT_SR, AXIS_SEED, AXIS_NOTHING) if label not in labels]
    if missing:
        raise UserError(f"this WebUI's X/Y/Z plot has no {', '.join(missing)} axis")
    return {label: labels.index(label) for label in (AXIS_PROMPT_SR, AXIS_SEED, AXIS_NOTHING)}


def checkpoint_override(shared, sd_models) -> dict:
    """Pins the loaded checkpoint, so no cell reloads another one picked in the settings meanwhile."""
    if getattr(shared.cmd_opts, "freeze_settings", False):
        # Then the setting cannot change, and A1111 could not restore an override afterwards.
        return {}
    info = shared.sd_model.sd_checkpoint_info
    setting = shared.opts.sd_model_checkpoint
    # The setting's own spelling when it names the loaded file, so pinning changes no setting.
    return {"sd_model_checkpoint": setting if sd_models.checkpoint_aliases.get(setting) is info else info.title}


def _check_listed(lora_names: list[str]) -> None:
    from lorakit_ext.webui import host

    # Without this A1111 renders an unknown name without any LoRA and only notes it in the infotext.
    host.refresh_loras()
    known = host.networks_module().available_networks
    missing = [name for name in lora_names if name not in known]
    if missing:
        raise UserError(f"A1111 lists no LoRA file {', '.join(missing)} in {host.lora_root()}")


def _collect(processed, plan: AxisPlan, shared) -> tuple[object, dict]:
    """The grid image and its cells from the script's result, or :class:`UserError` if any is missing."""
    n = plan.cell_count
    images = list(getattr(processed, "images", None) or [])
    infotexts = list(getattr(processed, "infotexts", None) or [])
    if getattr(shared.state, "interrupted", False) or getattr(shared.state, "stopping_generation", False):
        raise UserError("the epoch grid was interrupted before every cell was drawn")
    # With include_lone_images the script returns [grid, cell 0, cell 1, …]; a failed cell has no infotext.
    if len(images) != 1 + n or len(infotexts) != 1 + n or any(text is None for text in infotexts[1:]):
        done = sum(text is not None for text in infotexts[1:])
        raise UserError(f"A1111's X/Y/Z plot drew {done} of {n} cells; the console shows why")
    cells = {}
    nx, ny = len(plan.x_values), len(plan.seeds)
    for index, image in enumerate(images[1:]):
        ix, iy, iz = index % nx, index // nx % ny, index // (nx * ny)
        cells[(plan.column_labels[ix], plan.seeds[iy], plan.weights[iz])] = image
    return images[0], cells


def _grid_path(grid, processed, outpath_grids: str, plan: AxisPlan, shared) -> Path:
    """Where the script saved the grid, or where it is saved now when A1111's "save grids" is off."""
    saved = getattr(grid, "already_saved_as", None)
    if not saved:
        from modules import images

        saved, _ = images.save_image(
            grid, outpath_grids, GRID_BASENAME, seed=plan.seeds[0], prompt=plan.prompt,
            extension=shared.opts.grid_format, info=processed.infotexts[0], grid=True, p=processed,
        )
    # A1111 writes relative to its working folder, which is this process's.
    return Path(os.path.abspath(saved))


def _announcing_cells(processing_class, cells: int, state):
    """``processing_class`` with each grid cell named in A1111's progress text: the script copies
    ``p`` for every cell, and ``process_images`` calls ``init`` once per copy."""
    numbers = itertools.count(1)

    class AnnouncingCells(processing_class):
        def init(self, *args, **kwargs):
            job_progress.grid_cell(state, next(numbers), cells)
            return super().init(*args, **kwargs)

    return AnnouncingCells


def run_epoch_grid(
    lora_names: list[str], *, prompt: str, negative: str = "", seeds: list[int], weights: list[float] | None = None,
    baseline: bool = True, steps: int = 20, width: int = 512, height: int = 512, cfg_scale: float = 7.0,
    sampler_name: str | None = None, outpath_grids: str | None = None,
) -> GridResult:
    """Renders the epochs ``lora_names`` (A1111 Lora names, first one first) × ``seeds`` [× ``weights``]
    with A1111's X/Y/Z plot on the loaded checkpoint, plus the no-LoRA column when ``baseline``.

    Call it with A1111's queue lock held (from a job), never through A1111's HTTP API, which would
    wait for that lock. The grid goes to ``outpath_grids``, default A1111's txt2img grids folder.
    ``sampler_name`` None uses A1111's default sampler.
    """
    from modules import processing, sd_models, shared

    from lorakit_ext.webui import bridge

    plan = checked_plan(
        lora_names, prompt=prompt, negative=negative, seeds=seeds, weights=weights, baseline=baseline, steps=steps,
        width=width, height=height, cfg_scale=cfg_scale, max_megapixels=shared.opts.img_max_size_mp,
    )
    script = _xyz_script()
    values = script_values(plan, _axis_index(script))
    kwargs = run_kwargs(inspect.signature(script.run), values)
    _check_listed(list(lora_names))
    # Epoch files may have been rewritten under the same names since A1111 last used them: merged
    # weights and cached conditionings of the old files must not be reused.
    bridge.unmerge_networks(shared.sd_model)
    bridge.reset_cond_cache()
    grids = outpath_grids or shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids
    job_progress.grid_started(shared.state, plan.cell_count)
    txt2img = _announcing_cells(processing.StableDiffusionProcessingTxt2Img, plan.cell_count, shared.state)
    # Whole numbers (checked above), though a slider or config.json may hand them over as 512.0.
    steps, width, height = int(steps), int(width), int(height)
    p = txt2img(
        sd_model=shared.sd_model, outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples,
        outpath_grids=grids, prompt=plan.prompt, negative_prompt=negative, styles=[], seed=plan.seeds[0],
        sampler_name=sampler_name, batch_size=1, n_iter=1, steps=steps, cfg_scale=float(cfg_scale), width=width,
        height=height, do_not_save_samples=True, override_settings=checkpoint_override(shared, sd_models),
    )
    with closing(p):
        processed = script.run(p, **kwargs)
    grid, cells = _collect(processed, plan, shared)
    path = _grid_path(grid, processed, grids, plan, shared)
    return GridResult(path, grid, cells, plan.column_labels, [f"seed {s}" for s in plan.seeds])

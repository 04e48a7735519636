"""The pure parts of lorakit_ext.webui.xyz: the axis plan, the fill values, and the X/Y/Z script's
arguments built from ``run``'s signature, checked against the real ``scripts/xyz_grid.py`` of
A1111 1.6 to 1.10 read from a git mirror (those tests skip without it)."""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lorakit_ext.errors import UserError
from lorakit_ext.webui.xyz import (
    AXIS_NOTHING,
    AXIS_PROMPT_SR,
    AXIS_SEED,
    plan_axes,
    run_kwargs,
    script_values,
    weight_text,
    xyz_fill_values,
)

MIRROR = Path(os.environ.get("LORAKIT_A1111_GIT_DIR", "/work/.mirror/kklouzal+stable-diffusion-webui/repo"))
# 1.8.0 added vary_seeds_x/y/z.
RUN_ARGS = {"v1.6.0": 15, "v1.7.0": 15, "v1.8.0": 18, "v1.9.4": 18, "v1.10.1": 18}
INDEX = {AXIS_NOTHING: 0, AXIS_SEED: 1, AXIS_PROMPT_SR: 8}


def xyz_grid_source(tag: str) -> str:
    if shutil.which("git") is None or not MIRROR.is_dir():
        pytest.skip(f"no A1111 git mirror at {MIRROR} (set LORAKIT_A1111_GIT_DIR)")
    done = subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"{tag}:scripts/xyz_grid.py"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{tag} is not in {MIRROR}: {done.stderr.strip()}")
    return done.stdout


def script_class(source: str) -> ast.ClassDef:
    return next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Script")


def run_signature(source: str) -> inspect.Signature:
    """``Script.run``'s signature as written, without importing A1111 (gradio and torch)."""
    run = next(n for n in script_class(source).body if isinstance(n, ast.FunctionDef) and n.name == "run")
    args = run.args.posonlyargs + run.args.args
    first_default = len(args) - len(run.args.defaults)
    return inspect.Signature(
        [
            inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None if i >= first_default else inspect.Parameter.empty)
            for i, a in enumerate(args)
        ]
    )


def shared_axis_labels(source: str) -> list[str]:
    """Labels of the plain ``AxisOption`` entries (offered in txt2img and img2img alike)."""
    axis_list = next(
        n.value for n in ast.parse(source).body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "axis_options"
    )
    return [call.args[0].value for call in axis_list.elts if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "AxisOption"]


def plan():
    return plan_axes(["kat-01", "kat-02"], prompt="kat, photo <lora:kat-01:1>", seeds=[1, 2], weights=[1.0, 0.5])


# ---- against A1111's own sources ---------------------------------------------------------------
@pytest.mark.parametrize("tag", sorted(RUN_ARGS))
def test_every_run_argument_of_each_version_is_supplied(tag):
    signature = run_signature(xyz_grid_source(tag))
    wanted = [name for name in signature.parameters if name not in ("self", "p")]
    assert len(wanted) == RUN_ARGS[tag]
    kwargs = run_kwargs(signature, script_values(plan(), INDEX))
    assert list(kwargs) == wanted
    # Bound to the signature the way Python would call it: nothing missing, nothing extra.
    signature.bind(object(), object(), **kwargs)


@pytest.mark.parametrize("tag", sorted(RUN_ARGS))
def test_the_axes_used_exist_in_each_version(tag):
    source = xyz_grid_source(tag)
    labels = shared_axis_labels(source)
    assert {AXIS_NOTHING, AXIS_SEED, AXIS_PROMPT_SR} <= set(labels)
    # The script indexes its axis list built in ui(); run_epoch_grid reads the same list.
    assert "self.current_axis_options" in ast.unparse(script_class(source))


def test_unknown_required_argument_is_refused_and_optional_one_left_out():
    p = inspect.Parameter
    sig = inspect.Signature([p("self", p.POSITIONAL_OR_KEYWORD), p("p", p.POSITIONAL_OR_KEYWORD), p("x_type", p.POSITIONAL_OR_KEYWORD),
                             p("new_flag", p.POSITIONAL_OR_KEYWORD, default=False)])
    assert run_kwargs(sig, {"x_type": 8, "unused": 1}) == {"x_type": 8}
    sig = sig.replace(parameters=[*sig.parameters.values()][:3] + [p("future_option", p.POSITIONAL_OR_KEYWORD)])
    with pytest.raises(UserError, match="future_option"):
        run_kwargs(sig, {"x_type": 8})


# ---- what A1111 does with the plan, cell by cell ----------------------------------------------
def lora_of_cell(plan, x: str, z: str | None) -> tuple[str, float, float]:
    """(name, te, unet) of the single <lora:…> tag after Prompt S/R, read the way A1111's Lora
    extension reads it: positional te and unet (unet defaults to te), then te=/unet= override."""
    prompt = plan.prompt.replace(plan.x_values[0], x)
    if z is not None:
        prompt = prompt.replace(plan.z_values[0], z)
    assert prompt.count("<lora:") == 1
    items = prompt[prompt.index("<lora:") + 6 : prompt.index(">", prompt.index("<lora:"))].split(":")
    named = dict(item.split("=", 1) for item in items if "=" in item)
    positional = [item for item in items if "=" not in item]
    te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
    unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    return positional[0], te, unet


def test_plan_puts_baseline_first_and_weighs_it_zero_on_every_weight():
    p = plan()
    assert p.prompt == "kat, photo <lora:kat-01:te=0:unet=0:1.0>"
    assert p.x_values == ["kat-01:te=0:unet=0", "kat-01", "kat-02"]
    assert p.z_values == ["1.0", "0.5"] and p.weights == [1.0, 0.5]
    assert p.column_labels == ["no LoRA", "kat-01", "kat-02"] and p.cell_count == 12
    cells = {(label, w): lora_of_cell(p, x, z) for label, x in zip(p.column_labels, p.x_values) for w, z in zip(p.weights, p.z_values)}
    assert cells[("no LoRA", 1.0)][1:] == (0.0, 0.0) and cells[("no LoRA", 0.5)][1:] == (0.0, 0.0)
    assert cells[("kat-02", 0.5)] == ("kat-02", 0.5, 0.5) and cells[("kat-01", 1.0)] == ("kat-01", 1.0, 1.0)


def test_plan_without_baseline_or_weights():
    p = plan_axes(["kat-01", "kat-02"], prompt="kat, photo", seeds=[7], baseline=False)
    assert p.prompt == "kat, photo <lora:kat-01:1.0>" and p.x_values == ["kat-01", "kat-02"]
    assert p.z_values == [] and p.weights == [1.0] and p.column_labels == ["kat-01", "kat-02"]
    assert lora_of_cell(p, "kat-02", None) == ("kat-02", 1.0, 1.0)


def test_existing_tags_of_these_files_are_replaced_in_place_and_others_kept():
    p = plan_axes(["kat-01", "kat-02"], prompt="<lora:kat-02:0.3> kat <lora:style:1>, <lora:kat-01>", seeds=[1])
    assert p.prompt == "<lora:kat-01:te=0:unet=0:1.0> kat <lora:style:1>, "
    assert plan_axes(["kat-01"], prompt="", seeds=[1]).prompt == "<lora:kat-01:te=0:unet=0:1.0>"
    # kat-010 is another file: its tag stays.
    assert "<lora:kat-010:1>" in plan_axes(["kat-01"], prompt="<lora:kat-010:1>", seeds=[1]).prompt


def test_weight_search_term_falls_back_to_the_tag_spelling_when_ambiguous():
    p = plan_axes(["kat1.0-01"], prompt="x", seeds=[1], weights=[1, 0.5])
    assert p.z_values == [":1.0>", ":0.5>"]
    assert lora_of_cell(p, "kat1.0-01", ":0.5>") == ("kat1.0-01", 0.5, 0.5)
    with pytest.raises(UserError, match="weight axis"):
        plan_axes(["kat-01"], prompt="x <lora:style:1.0>, (y:1.0)", seeds=[1], weights=[1, 0.5])


def test_weight_text_always_has_a_decimal_point():
    assert [weight_text(w) for w in (1, 0.5, 2, -0.25, 0.75)] == ["1.0", "0.5", "2.0", "-0.25", "0.75"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_names": []}, "at least one LoRA"),
        ({"lora_names": ["a,b"]}, "cannot go into"),
        ({"lora_names": ["a:b"]}, "cannot go into"),
        ({"lora_names": ["kat-01", "kat-01"]}, "named twice"),
        ({"seeds": []}, "at least one seed"),
        ({"seeds": [-1]}, "whole number"),
        ({"seeds": [1, 1]}, "listed twice"),
        ({"weights": [1.0, 1.0000001]}, "repeat"),
        ({"weights": [float("nan")]}, "finite"),
        ({"negative": "ugly <lora:kat-01:1>"}, "negative prompt"),
        ({"prompt": "kat-01:te=0:unet=0 twice"}, "outside the <lora"),
        ({"baseline": False, "negative": "not kat-01"}, "outside the <lora"),
    ],
)
def test_plan_refuses_what_would_draw_a_wrong_grid(kwargs, message):
    args = {"lora_names": ["kat-01"], "prompt": "x", "seeds": [1], **kwargs}
    with pytest.raises(UserError, match=message):
        plan_axes(args.pop("lora_names"), **args)


def test_fill_values_for_txt2img():
    values = xyz_fill_values(["kat-01", "kat-02"], [1, 2], [1.0, 0.5], prompt="kat, photo")
    assert values == {
        "script": "X/Y/Z plot",
        "prompt": "kat, photo <lora:kat-01:te=0:unet=0:1.0>",
        "x_type": "Prompt S/R",
        "x_values": "kat-01:te=0:unet=0, kat-01, kat-02",
        "y_type": "Seed",
        "y_values": "1, 2",
        "z_type": "Prompt S/R",
        "z_values": "1.0, 0.5",
    }
    plain = xyz_fill_values(["kat-01"], [3], baseline=False)
    assert plain["prompt"] == "<lora:kat-01:1.0>" and plain["z_type"] == "Nothing" and plain["z_values"] == ""

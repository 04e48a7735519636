"""LoRA Kit's entries in A1111's Settings tab, and reading them with their defaults.

Paths are stored empty by default and resolved when used, so ``config.json`` never pins an
absolute path that goes stale when the WebUI folder moves. The two path settings are closed to
``POST /sdapi/v1/options`` (``restrict_api``): otherwise an API client could point the projects
root at ``/`` and walk around the server-path check in :mod:`lorakit_ext.webui.host`.
"""

from __future__ import annotations

from lorakit_ext.webui.limits import GRID_SIZE, GRID_STEPS
from lorakit_ext.webui.ui_inputs import CAPTIONERS

SECTION = ("lorakit", "LoRA Kit")
# DESIGN §1.8; `<trigger>` and `<name>` are filled in per run (see jobs.grid_prompt).
DEFAULT_TEST_PROMPT = "<trigger>, a photograph, a professional portrait of a model in high street fashion <lora:<name>-01:1>"

DEFAULTS = {
    "lorakit_projects_root": "",
    "lorakit_lora_subfolder": "",
    "lorakit_default_captioner": next(iter(CAPTIONERS)),
    "lorakit_test_prompt": DEFAULT_TEST_PROMPT,
    "lorakit_auto_grid": True,
    "lorakit_grid_seeds": "1,2",
    "lorakit_grid_size": 512,
    "lorakit_grid_steps": 20,
    "lorakit_clip_likeness": False,
}


def add_settings() -> None:
    """The ``on_ui_settings`` callback."""
    import gradio as gr
    from modules import shared

    def option(key, label, component=None, component_args=None, **kwargs):
        shared.opts.add_option(key, shared.OptionInfo(DEFAULTS[key], label, component, component_args, section=SECTION, **kwargs))

    option("lorakit_projects_root", "Projects folder (empty: <WebUI data folder>/lorakit)", restrict_api=True)
    option("lorakit_lora_subfolder", "Sub-folder of the Lora folder for epoch files (empty: the Lora folder itself)", restrict_api=True)
    option("lorakit_default_captioner", "Default captioner", gr.Dropdown, {"choices": list(CAPTIONERS)})
    option("lorakit_test_prompt", "Test prompt for epoch grids (<trigger> and <name> are filled in)", gr.Textbox, {"lines": 2})
    option("lorakit_auto_grid", "Make an X/Y/Z grid of the epochs after training")
    option("lorakit_grid_seeds", "Grid seeds (comma-separated)")
    option("lorakit_grid_size", "Grid image size", gr.Slider, GRID_SIZE.slider())
    option("lorakit_grid_steps", "Grid sampling steps", gr.Slider, GRID_STEPS.slider())
    option("lorakit_clip_likeness", "Measure epochs' likeness to the training images with CLIP too (a CLIP model already on "
                                    "this machine: SD1's openai/clip-vit-large-patch14 in the Hugging Face cache; skipped without one, never downloads)")


def setting(key: str):
    """The current value of one of LoRA Kit's settings, or its default before the settings exist."""
    from modules import shared

    return shared.opts.data.get(key, DEFAULTS[key])


def parse_seeds(text: str) -> list[int]:
    from lorakit_ext.errors import UserError

    try:
        seeds = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"grid seeds {text!r} should be whole numbers separated by commas, e.g. 1,2") from None
    if not seeds:
        raise UserError("no grid seeds given; set at least one (e.g. 1,2)")
    return seeds

"""Images drawn by A1111's own txt2img on the loaded model, inside a LoRA Kit job (which holds
A1111's queue lock): samples while training, with the LoRA as trained so far (the injected network
is in the model; nothing is merged), so they look like what the user will get; and regularisation
images, on the model as it is."""

from __future__ import annotations

import io
import re
from contextlib import closing
from pathlib import Path
from typing import Callable

from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.webui.settings import setting

# What A1111's prompt parser reads as emphasis ("(tag:1.2)", "[tag]") and its escape character.
_PROMPT_SYNTAX = re.compile(r"([\\()\[\]])")


def txt2img(prompt: str, seed: int, width: int, height: int, steps: int) -> list:
    """The images of one txt2img call on the loaded checkpoint, saving nothing; empty when A1111
    was interrupted before it began."""
    from modules import processing, sd_models, shared

    from lorakit_ext.webui.xyz import checkpoint_override

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt="", styles=[], seed=seed, batch_size=1,
        n_iter=1, steps=steps, cfg_scale=7.0, width=width, height=height,
        do_not_save_samples=True, do_not_save_grid=True, override_settings=checkpoint_override(shared, sd_models),
        outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples,
        outpath_grids=shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids,
    )
    with closing(p):
        return processing.process_images(p).images


def a1111_sampler(on_images: Callable[[list[Path]], None]):
    """A :data:`~lorakit_ext.train.sampling.Sampler`; ``on_images`` hears of each epoch's images."""

    def draw(request) -> list[Path]:
        width, height = request.size
        paths = []
        for index, (prompt, seed) in enumerate(zip(request.prompts, request.seeds)):
            images = txt2img(prompt, seed, width, height, int(setting("lorakit_grid_steps")))
            if not images:
                break  # interrupted: the training stops at its next step and says so
            buffer = io.BytesIO()
            images[0].save(buffer, format="PNG")
            path = request.path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        on_images(paths)
        return paths

    return draw


def a1111_render(width: int, height: int, steps: int):
    """A :data:`~lorakit_ext.dataset.reg_images.Render`. Its prompts are captions, plain text as
    kohya trains them, so A1111's emphasis brackets in them are escaped: "kat (genshin impact)"
    must not be weighted 1.1."""

    def render(prompt: str, seed: int):
        images = txt2img(_PROMPT_SYNTAX.sub(r"\\\1", prompt), seed, width, height, steps)
        return images[0] if images else None

    return render

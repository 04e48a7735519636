"""Samples while training, drawn by A1111's own txt2img on the loaded model with the LoRA as
trained so far (the injected network is in the model; nothing is merged), so they look like what
the user will get. Runs inside the training job, which holds A1111's queue lock."""

from __future__ import annotations

import io
from contextlib import closing
from pathlib import Path
from typing import Callable

from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.webui.settings import setting


def a1111_sampler(on_images: Callable[[list[Path]], None]):
    """A :data:`~lorakit_ext.train.sampling.Sampler`; ``on_images`` hears of each epoch's images."""

    def draw(request) -> list[Path]:
        from modules import processing, sd_models, shared

        from lorakit_ext.webui.xyz import checkpoint_override

        width, height = request.size
        paths = []
        for index, (prompt, seed) in enumerate(zip(request.prompts, request.seeds)):
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=prompt, negative_prompt="", styles=[], seed=seed, batch_size=1,
                n_iter=1, steps=int(setting("lorakit_grid_steps")), cfg_scale=7.0, width=width, height=height,
                do_not_save_samples=True, do_not_save_grid=True, override_settings=checkpoint_override(shared, sd_models),
                outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples,
                outpath_grids=shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids,
            )
            with closing(p):
                processed = processing.process_images(p)
            if not processed.images:
                break  # interrupted: the training stops at its next step and says so
            buffer = io.BytesIO()
            processed.images[0].save(buffer, format="PNG")
            path = request.path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        on_images(paths)
        return paths

    return draw

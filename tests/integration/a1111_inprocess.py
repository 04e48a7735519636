"""A real AUTOMATIC1111 WebUI started inside the test process, for integration tests.

Set ``LORAKIT_A1111_DIR`` to an A1111 checkout (the harness's ``$A1111H/webui``) and run pytest with
that WebUI's own Python, with this repository and pytest importable::

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration

Without the variable, :func:`skip_reason` says why the tests skip. ``LORAKIT_A1111_CKPT`` picks the
checkpoint (default: the harness's tiny SD1.5, ``models/Stable-diffusion/tiny-sd15.safetensors``).

Start-up is what A1111's ``webui.py`` does before it builds a server: ``initialize.imports()`` (which
parses the command line, loads ``config.json`` and the settings) and ``initialize.initialize()``
(model list, extensions, scripts, extra networks), with the harness's CPU flags, then the
``before_ui`` callbacks (where the Lora extension registers ``<lora:…>``). Then the model is loaded
in this thread instead of A1111's background thread, and txt2img's script runner is filled the way
building the UI or the API fills it. Everything the WebUI writes (``config.json``,
``cache.json``, ``outputs/``, ``models/Lora/``) goes to a temporary ``--data-dir``, removed when the
process ends, so the checkout and a server running from it are left alone. A1111 starts once per process: :func:`start` returns
the same instance after the first call.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ENV_DIR = "LORAKIT_A1111_DIR"
ENV_CKPT = "LORAKIT_A1111_CKPT"
TINY_CKPT = Path("models/Stable-diffusion/tiny-sd15.safetensors")
# The harness's launch flags (a1111-harness/start_a1111.sh) without the server ones.
FLAGS = (
    "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
    "--skip-install", "--skip-prepare-environment", "--no-download-sd-model",
    "--skip-version-check", "--skip-python-version-check", "--skip-load-model-at-start",
)
# The harness's settings (a1111-harness/write_config.py): nothing downloads, nothing live-previews.
SETTINGS = {
    "sd_vae": "None",
    "live_previews_enable": False,
    "show_progress_every_n_steps": -1,
    "show_progress_type": "Approx cheap",
    "face_restoration": False,
    "auto_launch_browser": "Disable",
    "gradio_theme": "Default",
    "samples_save": True,
    "grid_save": True,
    "CLIP_stop_at_last_layers": 1,
    "sd_checkpoint_cache": 0,
}
_started: A1111 | None = None


def _webui_dir() -> Path | None:
    value = os.environ.get(ENV_DIR, "").strip()
    return Path(value).resolve() if value else None


def _checkpoint(webui: Path) -> Path:
    return Path(os.environ.get(ENV_CKPT) or webui / TINY_CKPT).resolve()


def skip_reason() -> str | None:
    """Why an A1111 test cannot run here, or None."""
    webui = _webui_dir()
    if webui is None:
        return f"set {ENV_DIR} to an A1111 checkout and run with its Python to test against the real A1111"
    if not (webui / "modules" / "initialize.py").is_file():
        return f"{ENV_DIR}={webui} is not an A1111 (v1.6 or later) checkout"
    if not _checkpoint(webui).is_file():
        return f"no checkpoint {_checkpoint(webui)} (build the harness's tiny model or set {ENV_CKPT})"
    return None


@dataclass(frozen=True)
class A1111:
    webui: Path
    data: Path
    ckpt: Path

    @property
    def shared(self):
        from modules import shared

        return shared

    @property
    def lora_dir(self) -> Path:
        return Path(self.shared.cmd_opts.lora_dir)

    def txt2img(self, prompt: str, *, seed: int, negative: str = "", steps: int = 4, width: int = 64,
                height: int = 64, sampler_name: str = "Euler", cfg_scale: float = 7.0):
        """One image the way txt2img renders it, saving nothing; the A1111 settings' checkpoint."""
        from modules import processing

        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.shared.sd_model, outpath_samples=str(self.data / "outputs" / "reference"),
            outpath_grids=str(self.data / "outputs" / "reference"), prompt=prompt, negative_prompt=negative,
            styles=[], seed=seed, sampler_name=sampler_name, batch_size=1, n_iter=1, steps=steps,
            cfg_scale=cfg_scale, width=width, height=height, do_not_save_samples=True, do_not_save_grid=True,
        )
        with closing(p):
            return processing.process_images(p).images[0]

    def write_lora(self, name: str, seed: int, *, rank: int = 4, std: float = 0.2) -> Path:
        """A kohya LoRA with random weights for every module kohya's "LoRA" trains in the loaded
        model, written by LoRA Kit's writer into A1111's Lora folder; returns its path."""
        import torch

        from lorakit_ext.export.writer import ModuleWeights, write_lora_file
        from lorakit_ext.models.families.sd1 import SD1

        roots = SD1.component_roots(self.shared.sd_model)
        g = torch.Generator().manual_seed(seed)
        targets = SD1.target_modules(roots, "LoRA")
        modules = []
        for component, root in roots.items():
            for path, _ in targets[component]:
                weight = root.get_submodule(path).weight
                kernel = (1,) * (weight.ndim - 2)  # (1, 1) for the SpatialTransformer's 1x1 conv projections
                down = torch.randn((rank, weight.shape[1], *kernel), generator=g) * std
                up = torch.randn((weight.shape[0], rank, *kernel), generator=g) * std
                modules.append(ModuleWeights(SD1.kohya_name(component, path), down, up, float(rank)))
        metadata = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_module": "networks.lora",
                    "modelspec.architecture": "stable-diffusion-v1/lora"}
        return write_lora_file(self.lora_dir / f"{name}.safetensors", modules, metadata).path


def start() -> A1111:
    """The in-process A1111, initialised on the first call (about 10 s on 2 CPUs)."""
    global _started
    if _started is not None:
        return _started
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    webui = _webui_dir()
    ckpt = _checkpoint(webui)
    data = Path(tempfile.mkdtemp(prefix="lorakit-a1111-data-"))
    atexit.register(shutil.rmtree, data, ignore_errors=True)
    (data / "config.json").write_text(json.dumps({**SETTINGS, "sd_model_checkpoint": ckpt.name}), encoding="utf-8")
    (data / "models" / "Lora").mkdir(parents=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1")
    # A1111 reads its flags from sys.argv (plus $COMMANDLINE_ARGS) when its modules are imported,
    # and resolves its own files relative to the working folder, like launch.py run from the checkout.
    os.environ.pop("COMMANDLINE_ARGS", None)
    saved_argv = sys.argv
    sys.argv = ["webui.py", *FLAGS, "--data-dir", str(data), "--ckpt", str(ckpt)]
    os.chdir(webui)
    sys.path.insert(0, str(webui))
    try:
        from modules import initialize

        initialize.imports()
        initialize.initialize()
    finally:
        sys.argv = saved_argv
    from modules import script_callbacks, scripts, sd_hijack, shared

    # webui.py runs these before building the UI or the API; the Lora extension registers its
    # <lora:…> handler here, without which a tag silently does nothing.
    script_callbacks.before_ui_callback()
    shared.sd_model  # noqa: B018 - the property loads the checkpoint
    if sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    if not scripts.scripts_txt2img.scripts:
        scripts.scripts_txt2img.initialize_scripts(is_img2img=False)
    _started = A1111(webui, data, ckpt)
    return _started

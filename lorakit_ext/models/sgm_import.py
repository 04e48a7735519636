"""Using sgm (Stability-AI/generative-models: the SDXL classes A1111 runs) outside A1111: finding
it, importing it, and building SDXL's ``DiffusionEngine`` without the network.

sgm is not on PyPI. Inside A1111 it is imported already; headless it comes from the folder
``LORAKIT_SGM_DIR`` names (the CLI's ``--a1111-dir`` points it, and ``LORAKIT_LDM_DIR`` for ldm, at
A1111's own copies), or from an installed ``sgm`` package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from torch import nn

from ..errors import UserError
from .ldm_import import LDM_DIR_ENV, import_torchvision, missing_code, offline_clip_l, skip_random_init

SGM_DIR_ENV = "LORAKIT_SGM_DIR"
A1111_SGM = Path("repositories") / "generative-models"
A1111_LDM = Path("repositories") / "stable-diffusion-stability-ai"
HOW_TO_GET_SGM = (
    "SDXL's model code (sgm, from Stability-AI/generative-models) is not on PyPI. Point LoRA Kit at the copy "
    "an A1111 install keeps (--a1111-dir /path/to/stable-diffusion-webui), or clone "
    "https://github.com/Stability-AI/generative-models and set LORAKIT_SGM_DIR to that folder"
)
_TINY_VISION = {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14}


def use_a1111_model_code(a1111_dir: str | Path | None) -> None:
    """Makes ``--a1111-dir``'s copies of the model code the ones LoRA Kit imports: sgm (SDXL) from
    its ``repositories/generative-models``, ldm (SD1/SD2) from ``repositories/stable-diffusion-stability-ai``,
    unless ``LORAKIT_SGM_DIR``/``LORAKIT_LDM_DIR`` name others already: the edge where the user's
    choice becomes the process's. An install lacks sgm until it has run an SDXL model; one that has
    neither is refused."""
    if not a1111_dir:
        return
    root = Path(a1111_dir).expanduser()
    # Stability-AI/stablediffusion's ldm is a namespace package: no __init__.py, but ldm/util.py.
    found = {env: root / folder for env, folder, marker in ((SGM_DIR_ENV, A1111_SGM, "sgm/__init__.py"), (LDM_DIR_ENV, A1111_LDM, "ldm/util.py"))
             if (root / folder / marker).is_file()}
    if not found:
        raise UserError(f"{a1111_dir} has neither {A1111_LDM} nor {A1111_SGM}; give the stable-diffusion-webui folder of an "
                        "A1111 install that has started once")
    for env, folder in found.items():
        os.environ.setdefault(env, str(folder))


def import_sgm() -> ModuleType:
    """The ``sgm`` package: already imported (inside A1111), from ``LORAKIT_SGM_DIR``, or installed."""
    if "sgm" in sys.modules:
        return sys.modules["sgm"]
    folder = os.environ.get(SGM_DIR_ENV)
    if folder:
        if not (Path(folder) / "sgm" / "__init__.py").is_file():
            raise UserError(f"{SGM_DIR_ENV}={folder} has no sgm/__init__.py; {HOW_TO_GET_SGM}.")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import_torchvision()
            import sgm
            import sgm.models.diffusion  # noqa: F401
            import sgm.util  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_code(exc, "sgm", f"{HOW_TO_GET_SGM}.", "install LoRA Kit's [sdxl] extra (pip install -e '.[sdxl]')") from exc
    return sgm


def register_text_only_arch(name: str, arch: str) -> None:
    """Registers with open_clip an architecture ``name``: ``arch``'s text tower and a tiny vision
    tower. sgm deletes the vision tower once built; bigG's full one would be 1.8 B parameters of
    memory and start-up time for nothing."""
    import open_clip

    if open_clip.get_model_config(name) is not None:
        return
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"open_clip has no architecture {arch!r}")
    with tempfile.TemporaryDirectory(prefix="lorakit-open-clip-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps({**config, "vision_cfg": _TINY_VISION}))
        open_clip.add_model_config(path)


def build_sgm(config: dict, init_weights: bool = False) -> nn.Module:
    """sgm's ``DiffusionEngine`` from a config dict (``{"model": {"target", "params"}}``), offline, on
    the CPU in fp32, in eval mode; uninitialised unless ``init_weights`` (weights are loaded next)."""
    import_sgm()
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    cfg = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    params = cfg["model"]["params"]
    params["network_config"]["params"]["use_checkpoint"] = False
    # As A1111 builds SDXL, without xformers' attention (sgm's own yaml asks for it): the VAE's
    # xformers block needs the package, and the run's SDPA forwards replace the softmax ones.
    unet = params["network_config"]["params"]
    if unet.get("spatial_transformer_attn_type") == "softmax-xformers":
        unet["spatial_transformer_attn_type"] = "softmax"
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    if ddconfig.get("attn_type") == "vanilla-xformers":
        ddconfig["attn_type"] = "vanilla"
    embedders = params["conditioner_config"]["params"]["emb_models"]
    if params.get("sampler_config"):
        # sgm builds the sampler before the conditioner, and a yaml may use that entry to register
        # its own open_clip architecture (open_clip.add_model_config), which the renaming below reads.
        with contextlib.redirect_stdout(io.StringIO()):
            instantiate_from_config(OmegaConf.create(params["sampler_config"]))
    for embedder in embedders:
        if embedder["target"].endswith(".FrozenOpenCLIPEmbedder2"):
            arch = embedder["params"]["arch"]
            text_only = f"lorakit-{arch}-text"
            register_text_only_arch(text_only, arch)
            embedder["params"].update(arch=text_only, version=None)
    init = contextlib.nullcontext() if init_weights else skip_random_init()
    # sgm prints every block and embedder it builds.
    with offline_clip_l("sgm.modules.encoders.modules", embedders[0]["params"]), init, contextlib.redirect_stdout(io.StringIO()):
        model = instantiate_from_config(OmegaConf.create(cfg)["model"])
    return model.eval()

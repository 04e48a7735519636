"""Using ``ldm`` (the SD1/SD2 model classes A1111 runs) outside A1111: importing it, and building
its models without the network.

Inside A1111 ``ldm`` is already imported from its ``repositories/``; then this only imports it again.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..errors import UserError
from ..fsutil import atomic_write_text

LDM_DIR_ENV = "LORAKIT_LDM_DIR"
_INSTALL_LDM = (
    "give --a1111-dir with an A1111 install (its copy is used), or run `pip install --no-deps stable-diffusion-sdkit==2.1.5` "
    "and install LoRA Kit's `[ldm]` extra (`pip install -e '.[ldm]'` in the LoRA Kit folder; dev/setup.sh does both)"
)

# torch only keeps an operator definition while its Library object lives.
_torchvision_placeholder_ops: torch.library.Library | None = None


def import_torchvision() -> None:
    """Imports torchvision, also where a CUDA torchvision wheel sits next to a CPU build of torch.

    There torchvision's C++ ops fail to load, and its fake-kernel registrations then raise
    "operator torchvision::nms does not exist". Declaring the two operators it registers fakes for
    lets the Python package import; ldm needs none of its C++ ops.
    """
    global _torchvision_placeholder_ops
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    # The failed import left half-initialised submodules behind; a retry must not reuse them.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_placeholder_ops = lib
    import torchvision  # noqa: F401,F811


def _ignore_import_warnings() -> None:
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    # open_clip 2.20 imports timm.models.layers, which timm ≥ 0.9 calls deprecated (A1111's own venv).
    warnings.filterwarnings("ignore", message="Importing from timm.models.layers", category=FutureWarning)


@functools.lru_cache(maxsize=None)
def import_ldm() -> ModuleType:
    """Imports ``ldm`` and the modules its SD1/SD2 classes need; returns the ``ldm`` package: the
    one imported already (inside A1111), from the folder ``LORAKIT_LDM_DIR`` names (an A1111
    install's copy), or installed."""
    folder = os.environ.get(LDM_DIR_ENV)
    if folder and "ldm" not in sys.modules:
        if not (Path(folder) / "ldm" / "util.py").is_file():
            raise UserError(f"{LDM_DIR_ENV}={folder} has no ldm/util.py; point it at an A1111 install's "
                            "repositories/stable-diffusion-stability-ai, or unset it")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        # pytorch-lightning 1.9, pkg_resources, timm and ldm's "no xformers" print are noise to a user.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            _ignore_import_warnings()
            import_torchvision()
            # pytorch-lightning puts its own "show deprecations" filter in front of ours: override it.
            import pytorch_lightning  # noqa: F401
            _ignore_import_warnings()
            import ldm
            import ldm.models.autoencoder  # noqa: F401
            import ldm.models.diffusion.ddpm  # noqa: F401
            import ldm.modules.diffusionmodules.openaimodel  # noqa: F401
            import ldm.modules.encoders.modules  # noqa: F401
            import ldm.util  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_code(exc, "ldm", f"The Stable Diffusion model code (ldm) is not installed: {_INSTALL_LDM}.",
                           _INSTALL_LDM) from exc
    return ldm


def missing_code(exc: ModuleNotFoundError, package: str, absent: str, how: str) -> UserError:
    """The error for model code that failed to import: ``absent`` when ``package`` itself is
    missing, else which of its dependencies is, and ``how`` to install it."""
    missing = exc.name or str(exc)
    if missing == package or missing.startswith(package + "."):
        return UserError(absent)
    return UserError(f"{package} needs the Python package `{missing}`, which is missing: {how}.")


class CLIPTextModelFromConfig:
    """Stands in for transformers' ``CLIPTextModel`` inside ldm while a model is built: a model of
    the folder's ``config.json``, with no weights file needed (the checkpoint brings them)."""

    @staticmethod
    def from_pretrained(folder, *args, **kwargs):
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_pretrained(folder))


def write_clip_l_folder(folder: Path) -> str:
    from transformers import CLIPTextConfig

    from .clip_tokenizer import build_clip_tokenizer_files
    from .sd_configs import clip_l_text_config_dict

    build_clip_tokenizer_files(folder)
    atomic_write_text(folder / "config.json", CLIPTextConfig(**clip_l_text_config_dict()).to_json_string())
    return str(folder)


@contextlib.contextmanager
def _offline_text_encoder(model_params):
    """Makes ldm build the text encoder without the network: SD1's from a local folder (the config's
    own, or one holding CLIP ViT-L/14's tokenizer and config), SD2's without open_clip weights."""
    cond = model_params.cond_stage_config
    target = str(cond.get("target", ""))
    if target.endswith(".FrozenOpenCLIPEmbedder"):
        cond.setdefault("params", {})["version"] = None
    if not target.endswith(".FrozenCLIPEmbedder"):
        yield
        return
    with offline_clip_l("ldm.modules.encoders.modules", cond.setdefault("params", {})):
        yield


@contextlib.contextmanager
def offline_clip_l(encoders_module: str, params: dict):
    """Makes the CLIP-L embedder of ``encoders_module`` (ldm's or sgm's) build from a folder with
    its tokenizer and config and no weights file: the config's ``version`` when that is a folder,
    else one written for the block. The checkpoint brings the weights."""
    encoders = sys.modules[encoders_module]
    original = encoders.CLIPTextModel
    encoders.CLIPTextModel = CLIPTextModelFromConfig
    try:
        if Path(str(params.get("version", ""))).is_dir():
            yield
        else:
            with tempfile.TemporaryDirectory(prefix="lorakit-clip-l-") as tmp:
                params["version"] = write_clip_l_folder(Path(tmp))
                yield
    finally:
        encoders.CLIPTextModel = original


def _keep(tensor, *args, **kwargs):
    return tensor


_RANDOM_INITS = (
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"
)


def _zero_module_holders() -> list[ModuleType]:
    """The model-code modules (ldm's, sgm's) that define or import ``zero_module``: all of them are
    imported before a build (:func:`import_ldm`, ``import_sgm``), so none binds the stand-in for good."""
    return [module for name, module in list(sys.modules.items())
            if name.partition(".")[0] in ("ldm", "sgm") and callable(getattr(module, "zero_module", None))]


def _unchanged_module(module):
    return module


@contextlib.contextmanager
def skip_random_init():
    """Leaves new weights uninitialised: they are all overwritten by the checkpoint, and random
    init of a full SD model on the CPU takes longer than loading it. That includes ldm's and sgm's
    ``zero_module``, which writes zeros over every block's output layer: a quarter of the UNet,
    touched page by page (2.3 s of a 6.6 s SD1.5 load on the CPU)."""
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # transformers 5 moved it
        from transformers.initialization import no_init_weights

    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    holders = _zero_module_holders()
    zeroing = [module.zero_module for module in holders]
    try:
        for name in saved:
            setattr(torch.nn.init, name, _keep)
        for module in holders:
            module.zero_module = _unchanged_module
        with no_init_weights():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
        for module, fn in zip(holders, zeroing):
            module.zero_module = fn


def build_latent_diffusion(config: dict, init_weights: bool = True):
    """ldm's ``LatentDiffusion`` from a config dict (``{"model": {"target", "params"}}``), built
    offline on the CPU in fp32 and in eval mode. ``init_weights=False`` when weights are loaded next."""
    import_ldm()
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    params = cfg.model.params
    # As A1111's repair_config: no EMA copy, no ldm checkpointing (the trainer decides), no xformers.
    params.use_ema = False
    params.unet_config.params.use_checkpoint = False
    if params.first_stage_config.params.ddconfig.get("attn_type") == "vanilla-xformers":
        params.first_stage_config.params.ddconfig.attn_type = "vanilla"
    init = contextlib.nullcontext() if init_weights else skip_random_init()
    # ldm prints parameter counts and attention types while it builds.
    with _offline_text_encoder(params), init, contextlib.redirect_stdout(io.StringIO()):
        model = instantiate_from_config(cfg.model)
    return model.eval()

"""Training on A1111's loaded model (``shared.sd_model``) and giving it back exactly as it was.

Before a job: refuse what cannot be trained (Forge, kinds of model no family trains, ``--lowvram``,
fp8 weights), take out any LoRA the built-in Lora extension merged into the weights and any loaded
hypernetwork, and lift ``--medvram``'s offloading for the job. After it, whatever happened: free
memory, put the offloading back, and compare the weights with a fingerprint taken before, failing
loudly if they changed. The trainer itself removes what it injected (:mod:`lorakit_ext.train.network`); this
module checks that it did.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit_ext.errors import UserError
from lorakit_ext.models.families import trainable, unsupported_model
from lorakit_ext.webui import host

_FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name))
_LISTED = 5


class ModelChanged(RuntimeError):
    """The loaded model's weights or flags differ after a job: generations would be wrong."""


class LoraFileRejected(UserError):
    """A1111's own Lora loader cannot apply every module of a file LoRA Kit wrote."""


def loaded_model():
    from modules import shared

    if shared.sd_model is None:
        raise UserError(f"no checkpoint is loaded; pick an {trainable()} model in the checkpoint list first")
    return shared.sd_model


def _is_forge() -> bool:
    # Forge ships this package next to `modules`; A1111 has nothing by that name.
    return importlib.util.find_spec("modules_forge") is not None


def refusal(sd_model) -> str | None:
    """Why ``sd_model`` cannot be trained in this WebUI, or None."""
    from modules import devices, shared

    if _is_forge():
        return ("this is Stable Diffusion WebUI Forge, whose models have no trainable ldm path; in-process training "
                "needs AUTOMATIC1111's WebUI (LoRA files made elsewhere still load in Forge)")
    unsupported = unsupported_model(sd_model)
    if unsupported:
        return unsupported
    if getattr(shared.cmd_opts, "lowvram", False):
        return ("--lowvram moves the UNet to the GPU one block at a time, so it cannot be trained; restart the WebUI "
                "without --lowvram (--medvram works, or use the 'Low VRAM' preset)")
    if getattr(devices, "fp8", False) or any(p.dtype in _FLOAT8 for p in sd_model.parameters()):
        return ("the model is stored in fp8 (Settings > Optimizations > FP8 weight), which cannot be trained; "
                "set that option to Disable and reload the checkpoint")
    return None


def check_trainable(sd_model) -> None:
    reason = refusal(sd_model)
    if reason:
        raise UserError(reason)


# ---- what other features left in the weights ---------------------------------------------------
def unmerge_networks(sd_model) -> int:
    """Puts back the original weights of every module the built-in Lora extension changed; returns
    how many. The extension merges LoRA deltas in place and keeps them merged after a generation,
    with a backup of the original weights on each module."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_restore_weights_from_backup"):
        return 0
    networks.loaded_networks.clear()
    restored = 0
    # A1111's UNet parameters require grad; copying into them is only allowed without autograd.
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_restore_weights_from_backup(module)
                # Empty means "nothing merged": the next generation merges from the backup again.
                module.network_current_names = ()
                restored += 1
    return restored


def clear_hypernetworks() -> None:
    from modules import shared

    shared.loaded_hypernetworks.clear()


def reset_cond_cache() -> None:
    """Forgets A1111's cached prompt conditioning: after a LoRA file changes on disk, a cached
    conditioning computed with its old text-encoder weights would be reused for the same prompt."""
    from modules.processing import StableDiffusionProcessing

    StableDiffusionProcessing.cached_c = [None, None]
    StableDiffusionProcessing.cached_uc = [None, None]


# ---- the fingerprint -----------------------------------------------------------------------
@dataclass(frozen=True)
class Fingerprint:
    """Per component: state-dict keys, per-parameter (sum, sum of squares) in fp64, ``requires_grad``
    per parameter and ``training`` per module.

    A full hash would copy every weight to the host (about 2 GB for SD1.5 in fp16) twice per job.
    What goes wrong in practice — a LoRA delta left merged, an optimizer stepping a base weight, a
    wrapper left in place — moves these sums far beyond fp64 rounding or changes the key set, and
    the same reduction on the same device gives bit-identical results, so exact comparison works.
    """

    keys: dict[str, frozenset]
    sums: dict[str, dict[str, tuple[float, float]]]
    requires_grad: dict[str, dict[str, bool]]
    training: dict[str, dict[str, bool]]

    def changes(self, after: "Fingerprint") -> list[str]:
        out = []
        for part in self.keys:
            added, gone = after.keys[part] - self.keys[part], self.keys[part] - after.keys[part]
            if added or gone:
                out.append(f"{part}: state-dict keys added {_names(added)}, removed {_names(gone)}")
            for label, table in (("weights", "sums"), ("requires_grad", "requires_grad"), ("train/eval mode", "training")):
                old, new = getattr(self, table)[part], getattr(after, table)[part]
                differ = [name for name in old if name in new and old[name] != new[name]]
                if differ:
                    out.append(f"{part}: {label} changed for {len(differ)} entries ({_names(differ)})")
        return out


def _names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_LISTED]) or "none"
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _components(sd_model) -> dict:
    return {"unet": sd_model.model.diffusion_model, "text encoder": sd_model.cond_stage_model}


def fingerprint(sd_model) -> Fingerprint:
    keys, sums, grads, modes = {}, {}, {}, {}
    with torch.no_grad():
        for part, root in _components(sd_model).items():
            named = list(root.named_parameters())
            keys[part] = frozenset(root.state_dict().keys())
            if named:
                # Reduced on the device, read back in one transfer.
                stacked = torch.stack([torch.stack((p.double().sum(), p.double().square().sum())) for _, p in named]).cpu().tolist()
            else:
                stacked = []
            sums[part] = {name: tuple(values) for (name, _), values in zip(named, stacked)}
            grads[part] = {name: p.requires_grad for name, p in named}
            modes[part] = {name or "<root>": m.training for name, m in root.named_modules()}
    return Fingerprint(keys, sums, grads, modes)


# ---- --medvram ---------------------------------------------------------------------------------
@contextlib.contextmanager
def whole_model_on_device(sd_model):
    """Lifts ``--medvram`` for the duration: A1111 keeps the UNet, text encoder and VAE on the CPU and
    moves each to the GPU in a forward pre-hook, sending the previous one back. In training that
    hook would move the UNet, with the LoRA weights inside it, off the GPU whenever the text encoder
    runs. So the hooks (and the VAE's encode/decode wrappers) are taken off, the whole model goes to
    the GPU, and afterwards the hooked modules go back to the CPU with their hooks, which is the
    layout ``modules.lowvram`` built."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    from modules import devices, lowvram

    hooked = []
    for module in sd_model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "send_me_to_gpu":
                hooked.append((module, key, hook))
                del module._forward_pre_hooks[key]
    vae = sd_model.first_stage_model
    wrappers = {name: vars(vae).pop(name) for name in ("encode", "decode") if name in vars(vae)}
    lowvram.send_everything_to_cpu()
    try:
        sd_model.to(devices.device)
        yield
    finally:
        for module, _, _ in hooked:
            module.to(devices.cpu)
        for module, key, hook in hooked:
            module._forward_pre_hooks[key] = hook
        vars(vae).update(wrappers)


def free_memory() -> None:
    from modules import devices

    # Collect first: peft layers and optimizer state of the finished job may sit in reference cycles.
    gc.collect()
    devices.torch_gc()


@contextlib.contextmanager
def training_model(config):
    """Yields the family's adapter (:func:`~lorakit_ext.models.families.adapter_for`) over
    ``shared.sd_model``, prepared for training. Call with A1111's queue lock held. Raises :class:`ModelChanged` on the way out if the
    model's weights, keys or flags differ from when it was handed over."""
    from lorakit_ext.models.families import adapter_for

    sd_model = loaded_model()
    check_trainable(sd_model)
    unmerge_networks(sd_model)
    clear_hypernetworks()
    reset_cond_cache()
    try:
        with whole_model_on_device(sd_model):
            before = fingerprint(sd_model)
            try:
                # The adapter of the ldm families; it finds which one (SD1, SD2) the loaded model is.
                yield adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
            finally:
                changes = before.changes(fingerprint(sd_model))
                if changes:
                    raise ModelChanged(
                        "the loaded model differs after training, so generations would be wrong: "
                        + "; ".join(changes) + ". Reload the checkpoint (Settings > Actions > Reload) and report this bug."
                    )
    finally:
        free_memory()
        reset_cond_cache()


def checkpoint_identity(sd_model):
    """The loaded checkpoint as a :class:`~lorakit_ext.train.launch.BaseModel`; unknown parts are ""."""
    from lorakit_ext.train.launch import BaseModel

    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None:
        return BaseModel()
    path = str(Path(info.filename).resolve()) if getattr(info, "filename", None) else ""
    return BaseModel(Path(path).name if path else "", path, getattr(info, "hash", None) or "", getattr(info, "sha256", None) or "")


# ---- the post-save check ------------------------------------------------------------------------
def check_lora_file(path: Path) -> int:
    """Loads ``path`` with the built-in Lora extension's own loader against the loaded model and
    computes every module's weight delta the way a generation would. Raises
    :class:`LoraFileRejected` when a module matches no layer (the loader only logs those as "didn't
    match keys" and skips them) or its delta does not fit the layer; returns how many modules fit."""
    import safetensors

    networks = host.networks_module()
    on_disk = sys.modules["network"].NetworkOnDisk(path.stem, str(path))
    net = networks.load_network(path.stem, on_disk)
    with safetensors.safe_open(str(path), framework="pt") as fh:
        in_file = {key.partition(".")[0] for key in fh.keys()}
    matched = {module.network_key.partition(".")[0]: module for module in net.modules.values()}
    unmatched = sorted(in_file - set(matched))
    misfits = sorted(name for name, module in matched.items() if not _delta_fits(module))
    if unmatched or misfits:
        raise LoraFileRejected(
            f"A1111's Lora loader cannot use {path.name}: {len(unmatched)} of {len(in_file)} modules match no layer "
            f"({_names(unmatched)}), {len(misfits)} do not fit their layer ({_names(misfits)})"
        )
    return len(matched)


def _delta_fits(module) -> bool:
    weight = getattr(module.sd_module, "weight", None)
    if weight is None:  # SD2's packed attention: A1111 splits it itself when it applies the file
        return True
    try:
        with torch.no_grad():
            delta, _ = module.calc_updown(weight)
    except RuntimeError:
        return False
    return tuple(delta.shape) == tuple(weight.shape)

"""LoHa and LoKr: trained with peft's layers, written with the keys A1111's Lora extension reads, and
each file's delta, computed the way A1111 computes it, is the delta the model trained with.

"The way A1111 computes it" is A1111's own ``network.py``, ``lyco_helpers.py``, ``network_hada.py`` and
``network_lokr.py`` when ``LORAKIT_A1111_DIR`` names an A1111 checkout (they import only torch and,
for what a delta never touches, a few of A1111's modules, which get stand-ins while they load). Without
one, :func:`reference_updown` stands in: the same formulas transcribed, and
``test_the_reference_is_a1111s_own_formula`` checks the two agree wherever A1111 is at hand. A1111
computes in the file's dtype (fp16), as here: the comparisons allow fp16 rounding.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_export import make_metadata, module_a1111_maps
from test_train import model_fingerprint
from tiny_datasets import fill_dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorakit_ext.compare.sample import lora_merged
from lorakit_ext.errors import UserError
from lorakit_ext.export.apply import apply_lora_file, target_weight
from lorakit_ext.export.network_types import ADAPTER
from lorakit_ext.export.writer import read_lora_file, write_lora_file
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.families.sd1 import SD1
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.events import Interrupted
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train.network import injected
from lorakit_ext.train.state import load_state
from lorakit_ext.train_config import TrainConfig

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, train_batch_size=2, max_train_epochs=2,
             optimizer="AdamW", network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, unet_lr=1e-2,
             text_encoder_lr=1e-3, lr_scheduler="constant", keep_only_last_n_epochs=0, validate_every_n_epochs=0)
KEY_SETS = {
    "LoHa": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
    # w1 is always full; w2 is full where the rank is at least half its larger side (peft, LyCORIS).
    "LoKr": [{"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}],
}
TYPES = list(KEY_SETS)


# ---- A1111's delta --------------------------------------------------------------------------------
@functools.cache
def a1111_lora_modules() -> dict[str, types.ModuleType] | None:
    """A1111's network, network_hada and network_lokr modules, or None without ``LORAKIT_A1111_DIR``."""
    folder = Path(os.environ.get("LORAKIT_A1111_DIR", "/nonexistent")) / "extensions-builtin" / "Lora"
    if not (folder / "network_hada.py").is_file():
        return None
    standins = ["modules", "modules.models", "modules.models.sd3", "modules.models.sd3.mmdit",
                *(f"modules.{name}" for name in ("sd_models", "cache", "errors", "hashes", "shared"))]
    saved = {name: sys.modules.get(name) for name in [*standins, "network", "lyco_helpers"]}
    for name in standins:
        sys.modules[name] = types.ModuleType(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (nn.Linear,), {})
    loaded = {}
    try:
        for name in ("lyco_helpers", "network", "network_hada", "network_lokr"):
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            loaded[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
    finally:
        for name in ("network_hada", "network_lokr"):
            sys.modules.pop(name, None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return loaded


def reference_updown(w: dict[str, torch.Tensor], orig_weight: torch.Tensor) -> torch.Tensor:
    """A1111's ``calc_updown`` for the tensors LoRA Kit writes, transcribed from network_hada.py,
    network_lokr.py and network.py's ``finalize_updown``/``calc_scale`` (multiplier 1), in fp32."""
    w = {key: tensor.float() for key, tensor in w.items()}
    if "hada_w1_a" in w:
        updown = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        dim = w["hada_w1_b"].shape[0]
    else:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        updown = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)
        dim = next((w[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in w), None)
    scale = w["alpha"].item() / dim if dim is not None else 1.0
    return updown.reshape(orig_weight.shape) * scale


def a1111_updown(name: str, w: dict[str, torch.Tensor], sd_module: nn.Module, orig_weight: torch.Tensor) -> torch.Tensor:
    """The delta A1111 adds to ``orig_weight`` (of ``sd_module``, the module its loader maps ``name`` to)."""
    a1111 = a1111_lora_modules()
    if a1111 is None:
        return reference_updown(w, orig_weight)
    weights = a1111["network"].NetworkWeights(network_key=name, sd_key=name, w=w, sd_module=sd_module)
    net = a1111["network"].Network(name, None)
    module = next(filter(None, (t.create_module(net, weights) for t in (a1111["network_hada"].ModuleTypeHada(),
                                                                        a1111["network_lokr"].ModuleTypeLokr()))))
    updown, _ = module.calc_updown(orig_weight)
    return updown


def file_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, _ = read_lora_file(path)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        modules[name][part] = tensor
    return modules


def a1111_targets(family, sd_model, kinds_of: dict[str, str]):
    """Per module name of a file: ``(weight, rows, the module A1111's loader maps the name to)``."""
    roots = family.component_roots(sd_model)
    out = {}
    for name, kind in kinds_of.items():
        component, path = family.module_path_from_kohya(name)
        weight, rows = target_weight(roots[component], path)
        out[name] = (weight, rows, module_a1111_maps(roots[component], path, kind))
    return out


def kinds(family, sd_model, network_type: str) -> dict[str, str]:
    """Every module ``network_type`` trains in ``sd_model``, text encoders included: name → kind."""
    roots = family.component_roots(sd_model)
    return {family.kohya_name(c, path): kind for c, entries in family.target_modules(roots, network_type).items() for path, kind in entries}


def a1111_merge(family, sd_model, path: Path, kinds_of: dict[str, str]) -> nn.Module:
    """A copy of ``sd_model`` with the file merged by A1111's formulas."""
    merged = copy.deepcopy(sd_model)
    modules = file_modules(path)
    with torch.no_grad():
        for name, (weight, rows, sd_module) in a1111_targets(family, merged, kinds_of).items():
            target = weight[rows] if rows is not None else weight
            target += a1111_updown(name, modules[name], sd_module, target).float()
    return merged


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def sd_model(tiny_sd15_dir):
    model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    return model.eval()


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


def train(sd_model, project, folder: Path, stop_after: int = 0, resume_state=None, **overrides):
    """A run of SMALL with ``overrides`` in ``folder``; ``stop_after``: interrupted after that many steps."""
    config = TrainConfig(**{**SMALL, **overrides}).validate()
    job = TrainJob(config, project, folder / "out", folder / "run", base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    steps = []
    trainer = Trainer(LdmModel(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length), job,
                      should_stop=lambda: bool(stop_after) and len(steps) >= stop_after)
    trainer.on_progress = lambda p: steps.append(p) if p.phase == "training" else None
    return job, trainer.run(resume_state=resume_state)


def outputs(model, ids, x, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's and the UNet's outputs of a DiffusionModel."""
    with torch.no_grad():
        text = model.encode_text(ids)
        return text["crossattn"], model.predict(x, t, model.condition(text, torch.zeros(ids.shape[0], 6)))


def assert_within_fp16(ours, theirs, base):
    """``ours`` equals ``theirs`` within the fp16 rounding of the file, which the delta changed from ``base``."""
    for a, b, before in zip(ours, theirs, base):
        effect = (b - before).abs().max()
        assert effect > 1e-4, "the network must change the output"
        assert (a - b).abs().max() <= 5e-3 * effect + 1e-6, ((a - b).abs().max(), effect)


# ---- a run ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("network_type", TYPES)
def test_a_run_writes_a1111s_keys_and_its_file_is_the_trained_delta(sd_model, project, tmp_path, network_type):
    before = model_fingerprint(sd_model)
    job, result = train(sd_model, project, tmp_path, network_type=network_type, max_train_epochs=1)
    assert model_fingerprint(sd_model) == before
    modules = file_modules(result.files[-1])
    _, metadata = read_lora_file(result.files[-1])
    # Every module LoCon trains (3×3 convs at conv_dim included), each with exactly its type's keys.
    expected = kinds(SD1, sd_model, network_type)
    assert set(modules) == set(expected) == set(kinds(SD1, sd_model, "LoCon"))
    seen = [set(parts) for parts in modules.values()]
    assert all(keys in KEY_SETS[network_type] for keys in seen)
    assert all(keys in seen for keys in KEY_SETS[network_type])  # LoKr: full and low-rank w2 both occur
    assert all(t.dtype == torch.float16 for parts in modules.values() for t in parts.values())
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": network_type.lower(), "conv_dim": "2", "conv_alpha": "1.0"}
    toml = (job.run_dir / "kohya_config.toml").read_text()
    assert 'network_module = "lycoris.kohya"' in toml
    assert f'network_args = ["algo={network_type.lower()}", "conv_dim=2", "conv_alpha=1.0"]' in toml

    model = LdmModel(sd_model, clip_skip=job.config.clip_skip, max_token_length=75)
    torch.manual_seed(0)
    ids, x, t = model.tokenize(["kat, red hair"]), torch.randn(1, 4, 8, 8), torch.tensor([300])
    base = outputs(model, ids, x, t)
    with injected(model, job.config, seed=job.config.seed) as network:
        network.load_state_dict(load_state(job.run_dir)["network"])  # the weights of the last epoch
        trained = outputs(model, ids, x, t)
    merged = a1111_merge(SD1, sd_model, result.files[-1], expected)
    assert_within_fp16(outputs(LdmModel(merged, clip_skip=job.config.clip_skip, max_token_length=75), ids, x, t), trained, base)
    ours = copy.deepcopy(sd_model)
    assert apply_lora_file(ours, result.files[-1], SD1) == len(modules)
    assert_within_fp16(outputs(LdmModel(ours, clip_skip=job.config.clip_skip, max_token_length=75), ids, x, t), trained, base)


@pytest.mark.parametrize("network_type", TYPES)
def test_each_module_adds_a1111s_delta_of_its_file_tensors(sd_model, tmp_path, network_type):
    """Module by module: what the trained layer adds to its base layer's output is what A1111's delta
    of the written tensors adds (LoKr's folded scale included)."""
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    config = TrainConfig(**{**SMALL, "network_type": network_type})
    torch.manual_seed(1)
    with injected(model, config, seed=0) as network:
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(std=0.3)
        path = tmp_path / "kat.safetensors"
        write_lora_file(path, network.export(), make_metadata())
        modules = file_modules(path)
        worst, folded = 0.0, 0
        for comp in network.components:
            for module_path, layer in comp.root.named_modules():
                if not isinstance(layer, BaseTunerLayer):
                    continue
                name = SD1.kohya_name(comp.name, module_path)
                base = layer.get_base_layer()
                x = torch.randn(2, base.in_channels, 8, 8) if isinstance(base, nn.Conv2d) else torch.randn(2, 5, base.in_features)
                delta = a1111_updown(name, modules[name], base, base.weight).float()
                op = functools.partial(F.conv2d, stride=base.stride, padding=base.padding) if isinstance(base, nn.Conv2d) else F.linear
                with torch.no_grad():
                    added, expected = layer(x) - base(x), op(x, delta)
                worst = max(worst, float((added - expected).abs().max() / expected.abs().max()))
                if set(modules[name]) == {"lokr_w1", "lokr_w2", "alpha"}:
                    # Two full factors: A1111 ignores alpha, so lokr_w1 carries the scale and alpha reads as the rank.
                    folded += 1
                    assert float(modules[name]["alpha"]) == layer.r[ADAPTER]
                    scaled = layer.lokr_w1[ADAPTER].detach() * layer.scaling[ADAPTER]
                    assert torch.allclose(modules[name]["lokr_w1"].float(), scaled, rtol=1e-3, atol=1e-4)
    assert worst < 2e-3, worst
    assert (folded > 0) == (network_type == "LoKr")


def test_the_reference_is_a1111s_own_formula(sd_model, tmp_path):
    if a1111_lora_modules() is None:
        pytest.skip("set LORAKIT_A1111_DIR to an A1111 checkout to compare with its own Lora extension")
    for network_type in TYPES:
        model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
        torch.manual_seed(2)
        with injected(model, TrainConfig(**{**SMALL, "network_type": network_type}), seed=0) as network:
            with torch.no_grad():
                for p in network.parameters():
                    p.normal_(std=0.3)
            path = tmp_path / f"{network_type}.safetensors"
            write_lora_file(path, network.export(), make_metadata())
        modules = file_modules(path)
        for name, (weight, rows, sd_module) in a1111_targets(SD1, sd_model, kinds(SD1, sd_model, network_type)).items():
            w = {k: v.float() for k, v in modules[name].items()}
            assert torch.allclose(a1111_updown(name, w, sd_module, weight), reference_updown(w, weight), rtol=1e-5, atol=1e-7), name


# ---- OpenCLIP attention (SD2; SDXL's bigG is the same class) and SDXL ------------------------------
@pytest.mark.parametrize("network_type", TYPES)
def test_openclip_attention_trains_as_the_same_type_in_weight_space(tiny_sd2, tmp_path, network_type):
    sd, _ = load_sd_checkpoint(tiny_sd2[0])
    model = SD2.adapter(sd.eval(), clip_skip=1, max_token_length=75)
    ids = model.tokenize(["kat, red hair", "a dog on a beach"])
    with torch.no_grad():
        before = model.encode_text(ids)["crossattn"]
    config = TrainConfig(**{**SMALL, "network_type": network_type})
    with injected(model, config, seed=1) as network:
        attentions = [a for comp in network.components for a in comp.attentions]
        params = [p for a in attentions for _, p in a.named_parameters()]
        assert attentions and all(p.requires_grad and p.dtype == torch.float32 for p in params)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(std=0.3)
        trained = model.encode_text(ids)["crossattn"]
        trained.square().mean().backward()
        # Layer 0 is the one SD2's penultimate-layer conditioning uses (see test_attention_lora).
        first = next(a for a in attentions if a.path == "transformer.resblocks.0.attn")
        assert all(p.grad is not None and p.grad.abs().max() > 0 for _, p in first.named_parameters())
        path = tmp_path / "kat.safetensors"
        write_lora_file(path, network.export(), make_metadata(family=SD2))
    modules = file_modules(path)
    for layer in range(2):
        for leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert set(modules[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{leaf}"]) in KEY_SETS[network_type]
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids)["crossattn"], before)  # removed: the model is as it was
    ours = copy.deepcopy(sd)
    apply_lora_file(ours, path, SD2)
    for merged in (a1111_merge(SD2, sd, path, kinds(SD2, sd, network_type)), ours):
        with torch.no_grad():
            text = SD2.adapter(merged, clip_skip=1, max_token_length=75).encode_text(ids)["crossattn"]
        assert_within_fp16([text], [trained.detach()], [before])


def test_sdxl_trains_and_merges_both_types(tiny_sdxl, tmp_path):
    from lorakit_ext.models.families.sdxl import SDXL

    model = SDXL.adapter(copy.deepcopy(tiny_sdxl).eval(), clip_skip=1, max_token_length=75)
    torch.manual_seed(0)
    ids, x, t = model.tokenize(["kat, red hair"]), torch.randn(1, 4, 8, 8), torch.tensor([300])
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)

    def sdxl_outputs(m):
        with torch.no_grad():
            text = m.encode_text(ids)
            return [text["crossattn"], m.predict(x, t, m.condition(text, sizes))]

    base = sdxl_outputs(model)
    for network_type in TYPES:
        with injected(model, TrainConfig(**{**SMALL, "network_type": network_type}), seed=0) as network:
            with torch.no_grad():
                for p in network.parameters():
                    p.normal_(std=0.3)
            trained = sdxl_outputs(model)
            modules = network.export()
        path = tmp_path / f"{network_type}.safetensors"
        write_lora_file(path, modules, make_metadata(family=SDXL))
        written = file_modules(path)
        # bigG's attention projections (weight space) are of the type like every other module.
        assert any(name.startswith("lora_te2_") and "_self_attn_" in name for name in written)
        assert all(set(parts) in KEY_SETS[network_type] for parts in written.values())
        merged = copy.deepcopy(model.sd_model)
        assert apply_lora_file(merged, path, SDXL) == len(written)
        assert_within_fp16(sdxl_outputs(SDXL.adapter(merged, clip_skip=1, max_token_length=75)), trained, base)


# ---- resuming, continuing from a file -------------------------------------------------------------
def test_a_resumed_lokr_run_ends_bit_for_bit_where_an_uninterrupted_one_does(sd_model, project, tmp_path):
    _, full = train(sd_model, project, tmp_path / "a", network_type="LoKr", lr_scheduler="cosine")
    with pytest.raises(Interrupted):
        train(sd_model, project, tmp_path / "b", stop_after=3, network_type="LoKr", lr_scheduler="cosine")
    _, resumed = train(sd_model, project, tmp_path / "b", resume_state=load_state(tmp_path / "b" / "run"),
                       network_type="LoKr", lr_scheduler="cosine")
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    a, b = read_lora_file(full.files[-1])[0], read_lora_file(resumed.files[-1])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_lokr_network_continues_from_its_file_and_other_files_are_refused(sd_model, project, tmp_path):
    _, first = train(sd_model, project, tmp_path / "a", network_type="LoKr", max_train_epochs=1)
    path = first.files[-1]
    tensors, _ = read_lora_file(path)
    model = LdmModel(sd_model, clip_skip=2, max_token_length=75)
    config = TrainConfig(**{**SMALL, "network_type": "LoKr"})
    with injected(model, config, seed=5) as network:
        network.load_weights(path)
        # The folded modules' lokr_w1 is unfolded into the weight training scales, and folded again on export.
        exported = {f"{m.kohya_name}.{key}": tensor for m in network.export() for key, tensor in m.tensors.items()}
    assert exported.keys() == tensors.keys()
    assert all(torch.allclose(exported[key].half().float(), tensors[key].float(), rtol=1e-3, atol=1e-6) for key in tensors)
    assert any(tensors[key].abs().max() > 0 for key in tensors if key.endswith("lokr_w1"))  # trained, not fresh
    # A run continued from the file trains on from it.
    _, more = train(sd_model, project, tmp_path / "b", network_type="LoKr", max_train_epochs=1, network_weights=str(path))
    cont = read_lora_file(more.files[-1])[0]
    w1 = [key for key in tensors if key.endswith("lokr_w1")]
    moved = sum(float((cont[k].float() - tensors[k].float()).abs().sum()) for k in w1)
    assert 0 < moved < sum(float(tensors[k].float().abs().sum()) for k in w1)
    # Another type's file names the same modules, with other tensors.
    loha = tmp_path / "loha.safetensors"
    with injected(model, TrainConfig(**{**SMALL, "network_type": "LoHa"}), seed=5) as network:
        write_lora_file(loha, network.export(), make_metadata())
    with injected(model, config, seed=5) as network:
        with pytest.raises(UserError, match="is a LoHa module where this run trains LoKr"):
            network.load_weights(loha)
    with injected(model, TrainConfig(**{**SMALL, "network_type": "LoKr", "conv_dim": 4}), seed=5) as network:
        with pytest.raises(UserError, match="has rank 2 where this run has 4"):
            network.load_weights(path)


# ---- settings, merging, refusals ------------------------------------------------------------------
def test_a_lycoris_kohya_config_reads_as_the_type(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nnetwork_module = "lycoris.kohya"\nnetwork_dim = 8\nnetwork_alpha = 4.0\n'
                    'network_args = ["algo=lokr"]\n', encoding="utf-8")
    config = TrainConfig.from_file(path)
    # LyCORIS gives the convs the network's dim and alpha unless conv_dim/conv_alpha say otherwise.
    assert (config.network_type, config.conv_dim, config.conv_alpha) == ("LoKr", 8, 4.0)
    path.write_text('[train]\nnetwork_module = "networks.lora"\nnetwork_args = ["algo=loha"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="algo=loha is not supported with networks.lora"):
        TrainConfig.from_file(path)


def test_network_dropout_is_refused_for_lycoris_types(sd_model):
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    before = model_fingerprint(sd_model)
    with pytest.raises(UserError, match="network_dropout .* LoHa does not have"):
        with injected(model, TrainConfig(**{**SMALL, "network_type": "LoHa", "network_dropout": 0.1}), seed=0):
            pass
    assert model_fingerprint(sd_model) == before


def test_merging_for_samples_applies_the_type_and_refuses_what_it_cannot(sd_model, tmp_path):
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    with injected(model, TrainConfig(**{**SMALL, "network_type": "LoHa"}), seed=0) as network:
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(std=0.3)
        path = tmp_path / "kat.safetensors"
        write_lora_file(path, network.export(), make_metadata())
    before = model_fingerprint(sd_model)
    with lora_merged(sd_model, path, 0.5, SD1):
        assert model_fingerprint(sd_model)["weights"] != before["weights"]
    assert model_fingerprint(sd_model) == before
    # Tucker-decomposed convs (hada_t1/hada_t2) are not merged: the file changes nothing.
    tensors, metadata = read_lora_file(path)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    tucker = {**tensors, f"{name}.hada_t1": torch.zeros(2, 2, 3, 3, dtype=torch.float16)}
    save_file(tucker, str(tmp_path / "tucker.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match=f"{name} has alpha, hada_t1, .* not a LoRA, LoHa or LoKr module"):
        apply_lora_file(sd_model, tmp_path / "tucker.safetensors", SD1)
    assert model_fingerprint(sd_model) == before

"""The model-family seam: every registered family answers all of it, on a tiny model of its own.

A new family fails the first test until its tiny model is listed in ``TINY_MODELS``; then every
other test here runs on it as well. SDXL's tiny model needs sgm (``LORAKIT_SGM_DIR``), and its
tests skip without.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.card import SD_VERSIONS, sd_version_of
from lorakit_ext.models.checkpoint import load_sd_checkpoint, read_state_dict
from lorakit_ext.models.families import (
    FAMILIES,
    adapter_for,
    detect_family,
    family_of,
    family_of_model,
    unsupported_model,
)
from lorakit_ext.models.tiny import TINY_NAME
from lorakit_ext.train_config import NETWORK_TYPES, TrainConfig

def _loaded(request, name: str) -> SimpleNamespace:
    """An ldm family's tiny checkpoint (its .yaml beside it) from the session's fixtures, loaded."""
    path = {
        "sd1": lambda: request.getfixturevalue("tiny_sd15_dir") / f"{TINY_NAME}.safetensors",
        "sd2": lambda: request.getfixturevalue("tiny_sd2")[0],
    }[name]()
    model, info = load_sd_checkpoint(path)
    return SimpleNamespace(path=path, state_dict=read_state_dict(path), model=model, info=info)


@pytest.fixture(scope="module")
def tiny_sd1(request):
    return _loaded(request, "sd1")


@pytest.fixture(scope="module")
def tiny_sd2_model(request):
    return _loaded(request, "sd2")


@pytest.fixture(scope="module")
def tiny_sdxl_model(tmp_path_factory):
    from tiny_sdxl import write_tiny_sdxl_checkpoint

    path = write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("tiny-sdxl-file"))
    model, info = load_sd_checkpoint(path)
    return SimpleNamespace(path=path, state_dict=read_state_dict(path), model=model, info=info)


# Family name → the fixture of its tiny model; shared by the tests of this module, which only read them.
TINY_MODELS = {"sd1": "tiny_sd1", "sd2": "tiny_sd2_model", "sdxl": "tiny_sdxl_model"}
each_family = pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)


@pytest.fixture
def mine(family, request):
    """``path``, ``state_dict``, ``model`` and ``info`` of ``family``'s tiny model."""
    return request.getfixturevalue(TINY_MODELS[family.name])


def test_every_family_has_a_tiny_model_here_and_its_own_name():
    assert sorted(TINY_MODELS) == sorted(family.name for family in FAMILIES)
    assert len({family.label for family in FAMILIES}) == len(FAMILIES)
    assert all(family_of(family.name) is family for family in FAMILIES)
    with pytest.raises(ValueError, match="not one of sd1, sd2, sdxl"):
        family_of("sd9")


@each_family
def test_a_family_names_its_files_as_kohya_and_a1111_read_them(family):
    assert family.sd_version in SD_VERSIONS
    # A1111 gives a LoRA without a card the sd version its metadata says: it must be the family's own.
    assert sd_version_of({"ss_base_model_version": family.base_model_version, "ss_v2": str(family.v2)}) == family.sd_version
    assert isinstance(family.v2, bool) and family.base_model_version and family.modelspec_implementation
    for v in (False, True):
        assert family.architecture(v).endswith("/lora") and family.resolution(v) % 64 == 0
    assert "unet" in family.components
    assert all(prefix.startswith("lora_") and prefix.endswith("_") for prefix in family.components.values())


@each_family
def test_a_family_claims_its_checkpoints_alone_and_refuses_other_widths(family, mine):
    assert [f for f in FAMILIES if f.claims(mine.state_dict)] == [family]
    assert detect_family(mine.state_dict, mine.path) is family and mine.info.family is family
    assert "model" in family.model_config(mine.state_dict)
    # The tiny widths are not the full-size ones a file without a .yaml is built at.
    with pytest.raises(UserError, match=f"{family.label} keys but not {family.label}'s layer widths"):
        family.check_standard_widths(mine.state_dict, mine.path)


@each_family
def test_a_family_adapts_its_loaded_model(family, mine):
    sd_model = mine.model
    assert [f for f in FAMILIES if f.owns(sd_model)] == [family] and family_of_model(sd_model) is family
    roots = family.component_roots(sd_model)
    assert set(roots) == set(family.components) and roots["unet"] is sd_model.model.diffusion_model
    assert unsupported_model(sd_model) is None
    model = family.adapter(sd_model, clip_skip=1, max_token_length=75)
    assert model.family is family and model.sd_model is sd_model and type(adapter_for(sd_model)) is type(model)
    assert roots["unet"] is model.unet
    assert set(model.text_encoders) == set(roots) - {"unet"}
    assert all(model.text_encoders[name] is roots[name] for name in model.text_encoders)
    ids = model.tokenize(["a photo of a cat", "a dog"])
    noisy, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        cond = model.condition(model.encode_text(ids), torch.zeros(ids.shape[0], 6))
        assert cond["crossattn"].shape[0] == 2
        assert model.predict(noisy, timesteps, cond).shape == noisy.shape


@each_family
def test_a_familys_defaults_and_presets_are_valid_settings(family):
    assert family.train_config().validate() == TrainConfig(**family.defaults)
    for name in family.presets:
        family.train_config(name).validate()
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        family.train_config("nope")


@each_family
@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_kohya_names_round_trip_for_every_target_module(family, network_type, mine):
    roots = family.component_roots(mine.model)
    targets = family.target_modules(roots, network_type)
    assert set(targets) == set(roots) and all(targets.values())
    names = []
    for component, entries in targets.items():
        for path, kind in entries:
            name = family.kohya_name(component, path)
            assert name.startswith(family.components[component]) and "." not in name
            assert family.module_path_from_kohya(name) == (component, path)
            # An attention target's q/k/v name rows of its MultiheadAttention's packed weight.
            module = roots[component].get_submodule(path.rpartition(".")[0] if kind == "attention" else path)
            assert isinstance(module, nn.MultiheadAttention) if kind == "attention" else module is not None
            names.append(name)
    assert len(set(names)) == len(names)


def test_kinds_no_family_trains_are_refused_by_name():
    loaded = nn.Module()
    loaded.is_sd3 = True
    assert unsupported_model(loaded).startswith("SD3 training is not available")
    with pytest.raises(UserError, match="load an SD1, SD2 or SDXL checkpoint"):
        adapter_for(loaded)
    # A1111 sets its flags on every model; False is no refusal.
    plain = nn.Module()
    plain.is_sdxl = plain.is_sd3 = False
    assert unsupported_model(plain) is None
    with pytest.raises(UserError, match="cannot train this Module"):
        family_of_model(plain)

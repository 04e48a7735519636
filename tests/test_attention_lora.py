"""LoRA on OpenCLIP's attention (SD2's text encoder here; SDXL's bigG is the same class): the four
projections train in weight space, the file they export makes the merged model compute exactly
what the trained model computed, and removing them gives the user's model back untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from test_export import make_metadata
from torch import nn

from lorakit_ext.export.apply import apply_lora_file
from lorakit_ext.export.writer import read_lora_file, write_lora_file
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.train.network import injected
from lorakit_ext.train_config import TrainConfig

CONFIG = TrainConfig(network_dim=4, network_alpha=2.0, text_encoder_lr=1e-4)


@pytest.fixture
def sd2(tiny_sd2):
    model, _ = load_sd_checkpoint(tiny_sd2[0])
    return SD2.adapter(model.eval(), clip_skip=1, max_token_length=75)


def _attentions(model) -> list[nn.MultiheadAttention]:
    return [m for m in model.text_encoders["te"].modules() if isinstance(m, nn.MultiheadAttention)]


def _text(model, ids) -> torch.Tensor:
    return model.encode_text(ids)["crossattn"]


def test_the_exported_file_merges_into_exactly_what_training_computed(sd2, tmp_path):
    ids = sd2.tokenize(["kat, red hair", "a dog on a beach"])
    with torch.no_grad():
        before = _text(sd2, ids)
    with injected(sd2, CONFIG, seed=1) as network:
        attention_params = [p for comp in network.components for a in comp.attentions for _, p in a.named_parameters()]
        assert len(attention_params) == 2 * (4 + 4)  # 2 layers × (down, up) × (q, k, v, out)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(std=0.05)
            trained = _text(sd2, ids)
        path = tmp_path / "kat.safetensors"
        write_lora_file(path, network.export(), make_metadata(family=SD2))
    tensors, _ = read_lora_file(path)
    for layer in range(2):
        for leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te_text_model_encoder_layers_{layer}_self_attn_{leaf}.lora_up.weight" in tensors
    assert (trained - before).abs().max() > 0.05  # the attention LoRA changes the output
    with torch.no_grad():
        assert torch.equal(_text(sd2, ids), before)  # removed: the model is as it was
    merged = copy.deepcopy(sd2.sd_model)
    apply_lora_file(merged, path, SD2)
    with torch.no_grad():
        # Within the rounding of the file's fp16 LoRA weights.
        assert torch.allclose(_text(SD2.adapter(merged, clip_skip=1, max_token_length=75), ids), trained, atol=2e-3)


def test_gradients_reach_every_projection_and_removal_restores_the_modules(sd2):
    te = sd2.text_encoders["te"]
    originals = [(a, type(a), a.in_proj_weight, type(a.out_proj), a.out_proj.weight) for a in _attentions(sd2)]
    state = {k: v.clone() for k, v in te.state_dict().items()}
    ids = sd2.tokenize(["kat, red hair"])
    with injected(sd2, CONFIG, seed=1) as network:
        # A1111's Lora loader accepts an attention by its exact class: training must not change it.
        assert all(type(a) is cls and type(a.out_proj) is out_cls for a, cls, _, out_cls, _ in originals)
        for comp in network.components:
            for attention in comp.attentions:
                for down in attention.packed.lora_down:
                    assert down.requires_grad and down.dtype == torch.float32
        _text(sd2, ids).square().mean().backward()
        # SD2 conditions on the penultimate layer, so only layer 0 of the tiny 2-layer tower is used
        # (kohya names and saves the last layer's LoRA all the same). Up weights start at zero, so
        # theirs is the gradient that flows first.
        first = next(comp for comp in network.components if comp.name == "te").attentions[0]
        assert first.path == "transformer.resblocks.0.attn"
        ups = [*first.packed.lora_up, *first.out.lora_up]
        assert len(ups) == 4 and all(p.grad is not None and p.grad.abs().max() > 0 for p in ups)
    for attention, cls, in_proj, out_cls, out_weight in originals:
        assert type(attention) is cls and type(attention.out_proj) is out_cls
        assert attention.in_proj_weight is in_proj and attention.out_proj.weight is out_weight
        assert "forward" not in vars(attention) and not in_proj.requires_grad
    assert all(torch.equal(v, state[k]) for k, v in te.state_dict().items()) and te.state_dict().keys() == state.keys()

"""The injected LoRA layers: what they compute, what they keep for backward, where dropout acts."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.train.network import ADAPTER, injected
from lorakit_ext.train_config import TrainConfig

CONFIG = dict(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=2.0, network_type="LoCon", text_encoder_lr=1e-4)


@pytest.fixture
def model(tiny_sd15):
    return LdmModel(tiny_sd15[0], clip_skip=1, max_token_length=75)


def _layers(root, base_type):
    return [m for m in root.modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), base_type)]


def _input(layer, batch=2):
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        return torch.randn(batch, base.in_channels, 8, 8)
    return torch.randn(batch, 64, base.in_features)


@pytest.mark.parametrize("base_type", [nn.Linear, nn.Conv2d])
def test_layers_add_the_scaled_up_down_product_as_peft_does(model, base_type):
    torch.manual_seed(0)
    with injected(model, TrainConfig(**CONFIG).validate(), seed=0):
        layers = _layers(model.unet, base_type)
        assert layers
        layer = layers[0]
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)
        x = _input(layer)
        down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        expected = layer.get_base_layer()(x) + up(down(x)) * layer.scaling[ADAPTER]
        with torch.no_grad():
            ours = layer(x)
            peft = type(layer).forward(layer, x)
    is_3x3 = getattr(layer.get_base_layer(), "kernel_size", (1, 1)) == (3, 3)
    assert layer.scaling[ADAPTER] == (1.0 if is_3x3 else 0.5)
    assert not torch.equal(ours, layer.get_base_layer()(x)), "the LoRA path must contribute"
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, peft, rtol=1e-6, atol=1e-6)


def _saved_copies_of(x, fn):
    """Tensors autograd keeps for backward that are as large as ``x`` but not ``x`` itself."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    storage = x.untyped_storage().data_ptr()
    return [t for t in saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr() != storage]


def test_half_inputs_are_not_copied_for_backward_under_autocast(model):
    # An activation-sized copy per LoRA module is what made training use more memory than kohya's.
    model.unet.to(torch.bfloat16)
    with injected(model, TrainConfig(**CONFIG).validate(), seed=0):
        layer = _layers(model.unet, nn.Linear)[0]
        x = _input(layer).to(torch.bfloat16).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = _saved_copies_of(x, layer)
            peft = _saved_copies_of(x, lambda t: type(layer).forward(layer, t))
    assert ours == []
    assert peft, "peft's own forward keeps a cast copy of the input (the reason for our forward)"


def test_network_dropout_acts_on_the_rank_sized_down_output(model):
    seen = []
    with injected(model, TrainConfig(**{**CONFIG, "network_dropout": 0.5}).validate(), seed=0):
        layer = _layers(model.unet, nn.Linear)[0]
        dropout = layer.lora_dropout[ADAPTER]
        dropout.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1], torch.equal(args[0], out))))
        with torch.no_grad():
            layer.lora_B[ADAPTER].weight.normal_()
            x = _input(layer)
            layer.train()
            layer(x)
            layer.eval()
            layer(x)
    assert seen == [(4, False), (4, True)]


def _layer_sized_elementwise_ops(fn, numel):
    """The mul/add kernels a forward and backward run on tensors of ``numel`` elements or more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("mul", "mul_", "add", "add_") and out.numel() >= numel:
                self.seen.append(func.overloadpacket.__name__)
            return out

    with Ops():
        fn().sum().backward()
    return Ops.seen


def test_a_linear_layers_lora_adds_no_layer_sized_multiply_or_add_and_trains_as_peft_does(model):
    torch.manual_seed(0)
    with injected(model, TrainConfig(**CONFIG).validate(), seed=0):
        layer = _layers(model.unet, nn.Linear)[0]
        with torch.no_grad():
            layer.lora_B[ADAPTER].weight.normal_(std=0.1)
        x = _input(layer)
        size = layer(x).numel()
        params = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        ours = _layer_sized_elementwise_ops(lambda: layer(x), size)
        ours_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        peft = _layer_sized_elementwise_ops(lambda: type(layer).forward(layer, x), size)
        peft_grads = [p.grad for p in params]
    assert ours == [] and peft, peft
    for a, b in zip(ours_grads, peft_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

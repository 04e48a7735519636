"""Device-side pieces of the training step that CUDA graphs rely on, checked on the CPU."""

import pytest
import torch

from lorakit_ext.train.optim import DeviceLearningRates, build_scheduler
from lorakit_ext.train.step import DeviceLossScale
from lorakit_ext.train_config import TrainConfig


def test_loss_scale_unscales_finite_gradients_and_grows_nothing_yet():
    scale = DeviceLossScale(torch.device("cpu"))
    grads = [torch.full((3,), 2.0**16 * 0.5), torch.full((2,), 2.0**16)]
    scale.unscale(grads)
    assert float(scale.found_inf) == 0.0
    assert torch.equal(grads[0], torch.full((3,), 0.5)) and torch.equal(grads[1], torch.ones(2))
    scale.update()
    assert float(scale.scale) == 2.0**16 and int(scale.growth_tracker) == 1


def test_loss_scale_flags_overflow_and_backs_off_without_a_host_decision():
    scale = DeviceLossScale(torch.device("cpu"))
    scale.unscale([torch.tensor([1.0, float("inf")]), torch.ones(2)])
    assert float(scale.found_inf) == 1.0
    scale.update()
    assert float(scale.scale) == 2.0**15 and int(scale.growth_tracker) == 0
    saved = scale.state_dict()
    fresh = DeviceLossScale(torch.device("cpu"))
    fresh.load_state_dict(saved)
    assert float(fresh.scale) == 2.0**15


# No optimiser step runs here, which torch's scheduler warns about.
@pytest.mark.filterwarnings("ignore:Detected call of")
def test_device_learning_rates_follow_the_scheduler_in_place():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 1e-3}], capturable=False)
    for group in optimizer.param_groups:
        group["capturable"] = True  # what AdamW(capturable=True) records on CUDA
    config = TrainConfig(lr_scheduler="linear", lr_warmup_ratio=0.0)
    scheduler = build_scheduler(config, optimizer, total_steps=4, warmup_steps=0)
    lrs = DeviceLearningRates(optimizer, torch.device("cpu"))
    tensor = optimizer.param_groups[0]["lr"]
    assert isinstance(tensor, torch.Tensor) and float(tensor) == pytest.approx(1e-3)
    seen = []
    for _ in range(3):
        scheduler.step()
        lrs.sync()
        # The captured step reads this very tensor: it must be updated in place, never replaced.
        assert optimizer.param_groups[0]["lr"] is tensor
        seen.append(float(tensor))
    assert seen == pytest.approx([7.5e-4, 5e-4, 2.5e-4])


def test_device_learning_rates_leave_plain_optimisers_alone():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    DeviceLearningRates(optimizer, torch.device("cpu")).sync()
    assert optimizer.param_groups[0]["lr"] == 1e-3

"""Training core on a real (tiny) ldm SD1.5 model, CPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tiny_datasets import fill_dataset
from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.events import Interrupted
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train.loss import NoiseSchedule, diffusion_loss
from lorakit_ext.train.network import injected
from lorakit_ext.train.state import load_state
from lorakit_ext.train_config import TrainConfig

SMALL = dict(
    resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, train_batch_size=2,
    max_train_epochs=2, optimizer="AdamW", network_dim=4, network_alpha=2.0, unet_lr=1e-3,
    text_encoder_lr=1e-4, lr_scheduler="constant", keep_only_last_n_epochs=0,
)


def model_fingerprint(sd_model) -> dict:
    h = hashlib.sha256()
    for name, tensor in sorted(sd_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "weights": h.hexdigest(),
        "requires_grad": [(n, p.requires_grad) for n, p in sd_model.named_parameters()],
        "training": [(n, m.training) for n, m in sd_model.named_modules()],
        "modules": [(n, id(m)) for n, m in sd_model.named_modules()],
        "flags": [(n, vars(m).get("checkpoint"), vars(m).get("use_checkpoint"), "forward" in vars(m)) for n, m in sd_model.named_modules()],
    }


@pytest.fixture
def sd_model(tiny_sd15_dir):
    model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    model.eval()
    return model


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


def make_job(project, tmp_path, **overrides) -> TrainJob:
    config = TrainConfig(**{**SMALL, **overrides}).validate()
    return TrainJob(config, project, tmp_path / "out", project.runs / "run1", base_model_name="tiny-sd15")


def run(sd_model, job, **kwargs):
    job.run_dir.mkdir(parents=True, exist_ok=True)
    model = LdmModel(sd_model, clip_skip=job.config.clip_skip, max_token_length=job.config.max_token_length)
    return Trainer(model, job, **kwargs)


def test_loss_on_a_fixed_batch_halves(sd_model):
    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(latents)
    t = torch.tensor([300, 600])
    schedule = NoiseSchedule("cpu")
    ids = model.tokenize(["kat, red hair", "kat, blue shirt"])
    config = TrainConfig(**{**SMALL, "unet_lr": 1e-2, "text_encoder_lr": 1e-3})
    with injected(model, config, seed=0) as network:
        optimizer = torch.optim.AdamW(network.param_groups())
        losses = []
        for _ in range(40):
            pred = model.predict(schedule.add_noise(latents, noise, t), t, model.condition(model.encode_text(ids), torch.zeros(ids.shape[0], 6)))
            loss = diffusion_loss(pred, noise, schedule.snr[t], 5.0, False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def test_training_writes_kohya_epoch_files_and_leaves_the_model_untouched(sd_model, project, tmp_path):
    # Some model configs switch on ldm's own checkpointing, which cannot train LoRA (see below).
    for module in sd_model.model.diffusion_model.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.checkpoint = True
    before = model_fingerprint(sd_model)
    job = make_job(project, tmp_path)
    result = run(sd_model, job).run()
    assert model_fingerprint(sd_model) == before
    names = [p.name for p in result.files]
    assert names == ["kat-01.safetensors", "kat-02.safetensors"]
    assert result.steps == 4 and len(result.losses) == 4
    with safe_open(str(result.files[-1]), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        down = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    modules = {k.split(".")[0] for k in keys}
    assert len(modules) == 192 + 24 and len(keys) == 3 * len(modules)
    assert alpha.dim() == 0 and float(alpha) == 2.0 and down.dtype == torch.float16 and down.shape == (4, 32)
    assert meta["ss_output_name"] == "kat-02" and meta["ss_epoch"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert '"1_kat"' in meta["ss_tag_frequency"]
    run_dir = job.run_dir
    for name in ("config.json", "plan.txt", "loss.csv", "run.json", "kohya_config.toml", "state.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.csv").read_text().count("\n") == 5
    assert "Found 4 images with 1 repeats, equaling 4 steps." in (run_dir / "plan.txt").read_text()


def test_interrupt_saves_state_and_restores_the_model(sd_model, project, tmp_path):
    before = model_fingerprint(sd_model)
    calls = []
    trainer = run(sd_model, make_job(project, tmp_path), should_stop=lambda: len(calls) >= 3)
    trainer.on_progress = lambda p: calls.append(p) if p.phase == "training" else None
    with pytest.raises(Interrupted):
        trainer.run()
    assert model_fingerprint(sd_model) == before
    state = load_state(trainer.job.run_dir)
    assert state["position"]["global_step"] == 3


def test_exception_inside_a_step_restores_the_model(sd_model, project, tmp_path):
    before = model_fingerprint(sd_model)
    trainer = run(sd_model, make_job(project, tmp_path))
    original = trainer.model.predict
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return original(*args)

    trainer.model.predict = failing
    with pytest.raises(RuntimeError, match="illegal memory"):
        trainer.run()
    assert model_fingerprint(sd_model) == before


def test_nan_loss_stops_with_likely_causes(sd_model, project, tmp_path):
    trainer = run(sd_model, make_job(project, tmp_path))
    original = trainer.model.predict
    trainer.model.predict = lambda *a: original(*a) * float("nan")
    with pytest.raises(UserError, match="loss became nan at step 1; likely causes"):
        trainer.run()


def test_resume_continues_with_the_same_loss_sequence(sd_model, project, tmp_path):
    full = run(sd_model, make_job(project, tmp_path / "a")).run()
    job = make_job(project, tmp_path / "b")
    job.run_dir = project.runs / "run2"
    progress = []
    first = run(sd_model, job, should_stop=lambda: len(progress) >= 3)
    first.on_progress = lambda p: progress.append(p) if p.phase == "training" else None
    with pytest.raises(Interrupted):
        first.run()
    resumed = run(sd_model, job).run(resume_state=load_state(job.run_dir))
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    with safe_open(str(full.files[-1]), "pt") as a, safe_open(str(resumed.files[-1]), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_v_parameterization_trains_against_velocity(sd_model, project, tmp_path):
    from lorakit_ext.train.precision import Precision
    from lorakit_ext.train.step import StepFunction

    sd_model.parameterization = "v"
    trainer = run(sd_model, make_job(project, tmp_path, max_train_epochs=1))
    schedule = NoiseSchedule("cpu")
    step = StepFunction(trainer.model, schedule, trainer.config, Precision(None, False), [], None, train_te=False)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    ids = trainer.model.tokenize(["a", "b"])
    with torch.no_grad():
        got = step.loss(latents, ids, torch.zeros(2, 6), noise, t)
        pred = trainer.model.predict(schedule.add_noise(latents, noise, t), t, trainer.model.condition(trainer.model.encode_text(ids), torch.zeros(ids.shape[0], 6)))
        v = schedule.sqrt_alpha[t].view(-1, 1, 1, 1) * noise - schedule.sqrt_one_minus_alpha[t].view(-1, 1, 1, 1) * latents
        snr = schedule.snr[t]
        expected = (((pred - v) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert torch.allclose(got, expected, rtol=1e-5)
    result = trainer.run()
    with safe_open(str(result.files[0]), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"


def test_min_snr_weight_matches_kohya_for_epsilon():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    snr = torch.tensor([10.0, 2.0])
    assert diffusion_loss(pred, target, snr, 5.0, False).item() == pytest.approx((5 / 10 + 2 / 2) / 2)
    assert diffusion_loss(pred, target, snr, 0.0, False).item() == pytest.approx(1.0)


def test_bad_runs_are_refused_before_any_work(sd_model, project, tmp_path):
    with pytest.raises(UserError, match="batch size 8 is larger than the 4 images"):
        run(sd_model, make_job(project, tmp_path, train_batch_size=8)).run()
    empty = create_project(tmp_path / "projects", "empty")
    with pytest.raises(UserError, match="has no images"):
        run(sd_model, make_job(empty, tmp_path)).run()
    assert not (project.runs / "run1" / "config.json").exists()


def test_gradient_checkpointing_gives_lora_the_same_gradients(sd_model):
    from lorakit_ext.train.checkpointing import configure_checkpointing

    model = LdmModel(sd_model, clip_skip=1, max_token_length=75)
    torch.manual_seed(0)
    # 16×16 latents: at 8×8 the middle block attends over one token and its q/k get no gradient.
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    ids = model.tokenize(["kat"])

    def grads(network):
        model.predict(x, t, model.condition(model.encode_text(ids), torch.zeros(ids.shape[0], 6))).square().mean().backward()
        out = [p.grad.clone() for p in network.parameters()]
        for p in network.parameters():
            p.grad = None
        return out

    config = TrainConfig(**SMALL)
    with injected(model, config, seed=0) as network:
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(std=0.05)
        plain = grads(network)
        undo = configure_checkpointing(model.unet, True)
        checkpointed = grads(network)
        undo()
        # ldm's own checkpoint flag hands frozen base weights to autograd.grad and cannot train LoRA.
        blocks = [m for m in model.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        for block in blocks:
            block.checkpoint = True
        with pytest.raises(RuntimeError, match="does not require grad"):
            grads(network)
        for block in blocks:
            block.checkpoint = False
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_kohya_token_layout_227_states_for_225_tokens(sd_model):
    model = LdmModel(sd_model, clip_skip=2, max_token_length=225)
    ids = model.tokenize(["kat, " * 100])
    assert ids.shape == (1, 3, 77)
    assert (ids[:, :, 0] == 49406).all()
    assert model.condition(model.encode_text(ids), torch.zeros(ids.shape[0], 6))["crossattn"].shape == (1, 227, 32)
    short = LdmModel(sd_model, max_token_length=75)
    assert short.condition(short.encode_text(ids[:, :1]), torch.zeros(1, 6))["crossattn"].shape == (1, 77, 32)


def test_locon_trains_the_resblock_convs_at_conv_dim(sd_model, project, tmp_path):
    job = make_job(project, tmp_path, network_type="LoCon", conv_dim=2, conv_alpha=1.0, max_train_epochs=1)
    result = run(sd_model, job).run()
    with safe_open(str(result.files[0]), "pt") as f:
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
        assert '"conv_dim": "2"' in f.metadata()["ss_network_args"]
    assert down.shape == (2, 32, 3, 3) and float(alpha) == 1.0


def test_train_command_end_to_end_and_its_errors(tiny_sd15_dir, project, capsys):
    import json

    from lorakit_ext.cli import main

    ckpt = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    root = str(project.root)
    small = [f"--set={k}={v}" for k, v in SMALL.items() if k not in ("max_train_epochs", "num_repeats", "train_batch_size")]
    args = ["train", "kat", "--root", root, "--base-model", ckpt, "--epochs", "1", "--repeats", "1", "--batch-size", "2", *small]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "finished" and [p.rsplit("/", 1)[1] for p in out["files"]] == ["kat-01.safetensors"]
    # The checkpoint's hashes, computed while torch imports, as A1111 and kohya record them.
    data = Path(ckpt).read_bytes()
    metadata = read_lora_file(Path(out["files"][0]))[1]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert main(["train", "kat", "--root", root, "--base-model", str(project.root / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "kat", "--root", root, "--base-model", ckpt, "--resume", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def _saved_and_loaded(tmp_path, optimizer, network, files=()):
    from lorakit_ext.train.state import Position, load_state, save_state

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(tmp_path, network=network, optimizer=optimizer, scheduler=scheduler, scaler_state=None,
               position=Position(1, 0, 4), device=torch.device("cpu"), config={}, losses=[0.5], files=list(files))
    return load_state(tmp_path)


def test_resume_refuses_an_optimiser_state_another_optimiser_saved(tmp_path):
    from types import SimpleNamespace

    from lorakit_ext.train.state import restore_state

    network = torch.nn.Linear(3, 2)
    adamw = torch.optim.AdamW(network.parameters())
    network(torch.ones(1, 3)).sum().backward()
    adamw.step()
    state = _saved_and_loaded(tmp_path, adamw, network, files=[tmp_path / "kat-01.safetensors"])
    step = SimpleNamespace(load_scaler_state=lambda s: None)

    def restore(optimizer, saved):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return restore_state(saved, network=network, optimizer=optimizer, scheduler=scheduler, step=step, device=torch.device("cpu"))

    assert restore(torch.optim.AdamW(network.parameters()), state)[0].global_step == 4
    with pytest.raises(UserError, match=r"saved by torch\.optim\.adamw\.AdamW.*torch\.optim\.sgd\.SGD.*network_weights = .*kat-01"):
        restore(torch.optim.SGD(network.parameters(), lr=0.1), state)
    # A state from before the class was recorded, with bitsandbytes' 8-bit moments.
    del state["optimizer_class"]
    state["optimizer"]["state"] = {0: {"state1": torch.zeros(2, 3, dtype=torch.uint8), "step": torch.tensor(1.0)}}
    with pytest.raises(UserError, match="saved by bitsandbytes.optim.adamw.AdamW8bit"):
        restore(torch.optim.AdamW(network.parameters()), state)


def test_progress_reports_the_learning_rate_as_a_number_read_with_the_losses(sd_model, project, tmp_path, monkeypatch):
    # A captured optimiser's scheduler hands its rate back as a device tensor: the job status (JSON
    # over HTTP) needs a number, and reading the tensor at every step would wait for the GPU each time.
    reads = []

    def rate_as_tensor(scheduler):
        reads.append(len(reads))
        return [torch.tensor(scheduler.optimizer.param_groups[0]["lr"])]

    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "get_last_lr", rate_as_tensor)
    trainer = run(sd_model, make_job(project, tmp_path, max_train_epochs=3, text_encoder_lr=0.0, unet_lr=1e-3))
    trainer.loss_read_every = 2
    progress = []
    trainer.on_progress = lambda p: progress.append(p) if p.phase == "training" and p.step else None
    trainer.run()
    steps = [p.step for p in progress]
    assert len(steps) >= 6 and all(type(p.lr) is float and p.lr == pytest.approx(1e-3) for p in progress)
    # Read at the first report, then only at steps whose losses were just read (every 2nd).
    assert 1 < len(reads) < len(steps)

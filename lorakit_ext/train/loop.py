"""The trainer: dataset → latent cache → LoRA injected → epochs → kohya files, on a live model.

One :class:`Trainer` serves the CLI, the A1111 tab and the HTTP API. It reports through callbacks,
checks ``should_stop`` before every step, saves resumable state after every epoch and on
interrupt, and always leaves the model as it found it (see :mod:`lorakit_ext.train.network`).
The training step is a function of tensors with no host-side decisions
(:class:`~lorakit_ext.train.step.StepFunction`); on CUDA it is captured in graphs
(:mod:`lorakit_ext.train.graphs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from lorakit_ext.errors import UserError
from lorakit_ext.failures import as_user_error
from lorakit_ext.train.checkpointing import configure_checkpointing
from lorakit_ext.train.data import EpochBatches
from lorakit_ext.train.data_parallel import GradientSync, agree, rank_share, share_parameters, share_rng
from lorakit_ext.train.events import Interrupted, Progress
from lorakit_ext.models.layout import relayout_module
from lorakit_ext.models.training_forwards import use_training_forwards
from lorakit_ext.train.gpu_memory import Residency, prime_workspaces
from lorakit_ext.train.graphs import GraphedStep
from lorakit_ext.train.loss import NoiseSchedule
from lorakit_ext.train.network import injected
from lorakit_ext.train.optim import DeviceLearningRates, build_optimizer, build_scheduler
from lorakit_ext.train.preflight import dataset_schedule
from lorakit_ext.train.precision import resolve_precision
from lorakit_ext.train.train_job import RunResult, TrainJob
from lorakit_ext.train.record import ReadOnlyRecord, RunRecord, has_saved_state
from lorakit_ext.train.saving import EpochSaver
from lorakit_ext.train.state import Position, restore_state, save_state
from lorakit_ext.train.step import StepFunction, frozen_text_states
from lorakit_ext.train.sampling import Sampler, sample_request, sampling_due, sampling_due_at_step, sampling_mode, sampling_on
from lorakit_ext.train.start_caches import StartCaches

log = logging.getLogger(__name__)


class Trainer(StartCaches):
    def __init__(
        self,
        model,
        job: TrainJob,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        on_epoch_file: Callable[[Path], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        sampler: Sampler | None = None,
        phases: dict[str, float] | None = None,
    ):
        self.model = model
        self.job = job
        self.config = job.config
        self.on_progress = on_progress or (lambda p: None)
        self.on_epoch_file = on_epoch_file or (lambda p: None)
        self.should_stop = should_stop or (lambda: False)
        self.sampler = sampler  # draws the sample prompts every sample_every_n_epochs (None: never)
        self.device = model.device
        self.world = job.world
        self.stop_agreed = False  # data-parallel: some rank asked to stop, as of the last loss read
        self.loss_read_every = 1 if self.device.type == "cpu" else 10
        self.reported_lr: float | None = None
        # Seconds each part of the run's start took (run.json's phases_s), to see where the wait goes,
        # after those the caller measured before (``phases``: the CLI's imports, checks and model load);
        # to_first_step counts from the start of latent caching to the end of the first step.
        self.phases: dict[str, float] = dict(phases or {})
        # Each captured step's shape and what its capture added to the graphs' one memory pool.
        self.graph_pools: list[dict] = []
        # GPU: the most memory allocated and reserved so far at the end of each phase (run.json's
        # memory_peaks_gib): the first phase whose figure reaches the run's is where the peak is.
        self.memory_peaks: dict[str, dict[str, float]] = {}
        # Seconds each epoch's end took, by part (run.json's epoch_end_s): time between epochs' steps.
        self.epoch_ends: list[dict[str, float]] = []

    @contextlib.contextmanager
    def _phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - started, 3)
            self._note_memory_peak(name)

    def _note_memory_peak(self, name: str) -> None:
        if self.device.type == "cuda":
            self.memory_peaks[name] = {"allocated": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3),
                                       "reserved": round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)}

    # ---- preparation ----------------------------------------------------------------------------
    def prepare(self):
        """The dataset and the real schedule (a :class:`~lorakit_ext.train.preflight.DatasetSchedule`,
        as preflight read it, or read now); raises before any slow work."""
        if self.config.zero_terminal_snr and self.model.parameterization != "v":
            raise UserError(
                "zero_terminal_snr trains the last step on pure noise, where an ε-prediction model has nothing to "
                "predict; turn it off, or load the v-prediction version of the model"
            )
        return self.job.dataset or dataset_schedule(self.config, self.job.project.dataset, self.world.size)

    # ---- the run ------------------------------------------------------------------------------
    def run(self, resume_state: dict | None = None) -> RunResult:
        """Trains; ``run.json`` ends ``finished``, ``interrupted`` or ``failed`` (with the reason)
        however the run ends, also when it ends before the first step."""
        record = RunRecord(self.job.run_dir) if self.world.main else ReadOnlyRecord(self.job.run_dir)
        try:
            return self._run(record, resume_state)
        except Interrupted as exc:
            if record.info.get("status") != "interrupted":
                # Stopped before the first step (while caching latents): there is nothing to resume.
                record.end("interrupted", resumable=False, error=str(exc))
            raise
        except KeyboardInterrupt:
            # A second Ctrl-C stops at once; the state of the last finished epoch is still there.
            record.end("interrupted", resumable=has_saved_state(self.job.run_dir),
                       error="stopped at once by a second Ctrl-C; a resume continues from the last saved epoch")
            raise
        except BaseException as exc:
            record.fail(_reason(exc))
            raise

    def _run(self, record: RunRecord, resume_state: dict | None) -> RunResult:
        config = self.config
        data = self.prepare()
        items, buckets, estimate, schedule = data.items, data.buckets, data.estimate, data.schedule
        weight_dtype = next(self.model.unet.parameters()).dtype
        self.precision = resolve_precision(config.mixed_precision, self.device, weight_dtype)
        self.schedule = NoiseSchedule(self.device, zero_terminal=config.zero_terminal_snr)
        # What samples draw from: the training images' captions, regularisation images' aside.
        train_captions = [item.caption for item in items if not item.regularisation]
        samples = sample_request(config, train_captions, 0, self.job.run_dir, self.job.stem) if sampling_on(config) else None
        record.start(config, estimate, schedule, buckets, self.precision.name, self.model, self.job,
                     repeats=[item.repeats for item in items], folders=[folder for folder, _ in data.folders], samples=samples)
        real = f"After bucketing: {schedule.steps_per_epoch} steps per epoch, {schedule.total_steps} in total."
        self.on_progress(Progress("caching", message="\n".join(estimate.lines + [real])))
        cuda = self.device.type == "cuda"
        prime_workspaces(self.device)
        # All randomness (VAE sampling, noise, timesteps, dropout) comes from torch's generators,
        # seeded here; forking them leaves the host application's random streams as they were.
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.manual_seed(config.seed)
            self._run_started = time.perf_counter()
            with Residency(self.device) as residency:
                cache, validation, text_cache, validation_text = self._cache_before_steps(data, residency)
                self.phases["module_moves"] = round(residency.seconds, 3)
                share_rng(self.world, self.device)
                saver = EpochSaver(self.job, self.model, items, buckets, schedule, self.precision.name, data.folders)
                position, losses = self._train(cache, items, train_captions, buckets, schedule, saver, record, resume_state,
                                               validation, text_cache, validation_text)
        self._note_memory_peak("run")
        record.finish("finished", losses, saver.files, self.validation_losses, phases=self.phases, epoch_ends=self.epoch_ends,
                      graph_pools=self.graph_pools,
                      memory_peaks_gib=self.memory_peaks)
        return RunResult("finished", list(saver.files), losses, position.global_step, self.job.run_dir, list(self.validation_losses))

    def _train(self, cache, items, train_captions, buckets, schedule, saver, record, resume_state, validation, text_cache,
               validation_text):
        config, model = self.config, self.model
        channels_last = self.device.type == "cuda" if self.job.channels_last is None else self.job.channels_last
        with contextlib.ExitStack() as stack:
            if channels_last:
                # Faster convolutions; undone (weights back to the standard layout) after the run.
                stack.callback(relayout_module(model.unet, torch.channels_last))
            with self._phase("network"):
                network = stack.enter_context(injected(model, config, config.seed))
                if config.network_weights and resume_state is None:
                    network.load_weights(Path(config.network_weights))
                # Compiled blocks fuse the LoRA weights' casts into their own kernels; with the half
                # copies as well, one H100 run had not compiled its shape in twice the time.
                half_weights = (network.use_half_weights(self.precision.autocast)
                                if self.precision.autocast and not self.job.compile_blocks else None)
            stack.callback(configure_checkpointing(model.unet, config.gradient_checkpointing))
            stack.callback(use_training_forwards(model.unet, self.device, stock_attention=self.job.patch_attention))
            if self.job.compile_blocks:
                from lorakit_ext.models.compiled_blocks import compile_blocks  # imports dynamo: only when asked

                stack.callback(compile_blocks(model.unet))
            optimizer, choice = build_optimizer(config, network.param_groups(), self.device)
            saver.optimizer_name = choice.name
            if choice.note:
                self.on_progress(Progress("training", message=choice.note))
            scheduler = build_scheduler(config, optimizer, schedule.total_steps, schedule.warmup_steps)
            lrs = DeviceLearningRates(optimizer, self.device)
            world = self.world
            step_fn = StepFunction(model, self.schedule, config, self.precision, network.parameters(), optimizer,
                                   config.text_encoder_lr > 0, text_cached=config.cache_text_encoder_outputs,
                                   sync=GradientSync(world) if world.distributed else None, half_weights=half_weights)
            graphed = GraphedStep(step_fn, on_fallback=lambda reason: self.on_progress(Progress("training", message=f"CUDA graphs off: {reason}")))
            self.graph_pools = graphed.pools
            stack.callback(graphed.release)
            position, losses, self.validation_losses = Position(0, 0, 0), [], []
            if resume_state is not None:
                position, losses = restore_state(resume_state, network=network, optimizer=optimizer, scheduler=scheduler, step=step_fn, device=self.device)
                lrs.sync()
                saver.files = [Path(p) for p in resume_state.get("files", [])]
                self.validation_losses = [tuple(row) for row in resume_state.get("validation", [])]
            share_parameters(world, network.parameters())

            def save(pos: Position) -> None:
                if not world.main:
                    return
                save_state(self.job.run_dir, network=network, optimizer=optimizer, scheduler=scheduler,
                           scaler_state=step_fn.scaler_state(), position=pos, device=self.device,
                           config=config.to_dict(), losses=losses, files=saver.files, validation=self.validation_losses)

            def validate(epoch: int) -> float | None:
                due = validation is not None and (epoch % config.validate_every_n_epochs == 0 or epoch == schedule.epochs)
                if not due:
                    return None
                self.on_progress(Progress("validating", epoch=epoch, epochs=schedule.epochs, step=position.global_step,
                                          total_steps=schedule.total_steps))
                text_states = (validation_text.states if validation_text is not None
                               else lambda indices: frozen_text_states(model, self.precision, model.tokenize([validation.captions[i] for i in indices])))
                value = validation.loss_in_eval_mode([comp.root for comp in network.components], step_fn.prediction_error,
                                                     text_states, channels_last=channels_last)
                self.validation_losses.append((epoch, position.global_step, value))
                self.on_progress(Progress("validating", epoch=epoch, epochs=schedule.epochs, step=position.global_step,
                                          total_steps=schedule.total_steps, validation_loss=value,
                                          message=f"epoch {epoch}: validation loss {value:.4f}"))
                return value

            pending: list[torch.Tensor] = []
            group: list[torch.Tensor] = []  # the losses of the batches of this optimizer step
            accumulate = config.gradient_accumulation_steps
            started, first_step = time.perf_counter(), position.global_step
            for epoch in range(position.epoch, schedule.epochs):
                batches = EpochBatches.from_config(config, cache, items, buckets, epoch, batch_size=config.train_batch_size * world.size)
                for step in range(position.step_in_epoch if epoch == position.epoch else 0, len(batches)):
                    # A group of batches starts at every multiple of gradient_accumulation_steps;
                    # the run stops and saves only there, with no half-summed gradients to lose.
                    first, last = step % accumulate == 0, step % accumulate == accumulate - 1 or step == len(batches) - 1
                    if first and position.global_step >= schedule.total_steps:
                        break
                    if first and (self.stop_agreed if world.distributed else self.should_stop()):
                        self._flush(pending, losses, position.global_step)
                        save(Position(epoch, step, position.global_step))
                        record.finish("interrupted", losses, saver.files, self.validation_losses, resumable=True)
                        raise Interrupted()
                    batch, rows = rank_share(batches[step], world, config.train_batch_size) if world.distributed else (batches[step], None)
                    latents = batch.latents.contiguous(memory_format=torch.channels_last) if channels_last else batch.latents
                    text = text_cache.states(batch.indices) if text_cache else model.tokenize(batch.captions)
                    group.append(graphed(latents, text, batch.sizes, weights=batch.loss_weights, first=first, last=last, rows=rows))
                    if "to_first_step" not in self.phases:
                        self._first_step_done()
                    if not last:
                        continue
                    pending.append(group[0] if len(group) == 1 else torch.stack(group).mean())
                    group.clear()
                    scheduler.step()
                    lrs.sync()
                    position.global_step += 1
                    if len(pending) >= self.loss_read_every:
                        self._flush(pending, losses, position.global_step)
                    self._report(epoch, schedule, position.global_step, losses, scheduler, started, first_step, synced=not pending)
                    if world.main:
                        for path in saver.save_step(network, epoch + 1, position.global_step):
                            self.on_epoch_file(path)
                        self._sample(network, train_captions, epoch + 1, schedule.epochs, position.global_step)
                self._flush(pending, losses, position.global_step)
                position = Position(epoch + 1, 0, position.global_step)
                marks = [time.perf_counter()]
                validation_loss = validate(epoch + 1)
                marks.append(time.perf_counter())
                self.on_progress(Progress("saving", epoch=epoch + 1, epochs=schedule.epochs, step=position.global_step, total_steps=schedule.total_steps))
                if world.main:
                    for path in saver.save_epoch(network, epoch + 1, position.global_step, validation_loss):
                        self.on_epoch_file(path)
                    self._sample(network, train_captions, epoch + 1, schedule.epochs)
                marks.append(time.perf_counter())
                save(position)
                marks.append(time.perf_counter())
                self.epoch_ends.append({"epoch": epoch + 1, **{part: round(b - a, 3) for part, a, b in
                                                               zip(("validation", "files_and_samples", "resume_state"), marks, marks[1:])}})
                record.update(losses, saver.files, self.validation_losses, self.phases, self.epoch_ends)
                if position.global_step >= schedule.total_steps:
                    break
        return position, losses

    def _sample(self, network, captions, epoch: int, epochs: int, step: int | None = None) -> None:
        """The samples of the epoch that just ended, or (``step``) of the optimizer step just taken."""
        due = sampling_due(self.config, epoch, epochs) if step is None else sampling_due_at_step(self.config, step)
        if self.sampler is None or not due:
            return
        request = sample_request(self.config, captions, epoch, self.job.run_dir, self.job.stem, step)
        when = f"epoch {epoch}" if step is None else f"step {step}"
        self.on_progress(Progress("sampling", epoch=epoch, epochs=epochs, message=f"drawing {len(request.prompts)} sample(s) of {when}"))
        with sampling_mode([comp.root for comp in network.components], list(self.model.text_encoders.values()), self.device):
            self.sampler(request)

    def _first_step_done(self) -> None:
        # One wait for the device, once: the start-up figure is the first step's end, not its launch.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.phases["to_first_step"] = round(time.perf_counter() - self._run_started, 3)
        self._note_memory_peak("to_first_step")

    def _flush(self, pending: list[torch.Tensor], losses: list[float], global_step: int) -> None:
        """Reads the losses accumulated on the device (one host sync; data-parallel: the ranks'
        mean, and whether any asked to stop) and stops on NaN/inf."""
        if not pending:
            return
        stacked, self.stop_agreed = agree(self.world, torch.stack(pending), self.world.distributed and self.should_stop())
        values = stacked.float().cpu().tolist()
        pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                step = global_step - len(values) + offset + 1
                raise UserError(
                    f"the loss became {value} at step {step}; likely causes: a learning rate too high "
                    f"(unet_lr {self.config.unet_lr}, text_encoder_lr {self.config.text_encoder_lr}), fp16 overflow "
                    "(try bf16, or --no-half), or a VAE that returns NaN in fp16 (--no-half-vae)"
                )
        losses.extend(values)

    def _report(self, epoch, schedule, global_step, losses, scheduler, started, first_step, *, synced: bool) -> None:
        # A captured optimiser keeps its learning rate in a device tensor; reading it at every step
        # would wait for the GPU at every step, so it is read just after the losses were (``synced``).
        if synced or self.reported_lr is None:
            self.reported_lr = float(scheduler.get_last_lr()[0])
        done = global_step - first_step
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else None
        eta = (schedule.total_steps - global_step) / rate if rate else None
        self.on_progress(
            Progress(
                "training",
                epoch=epoch + 1,
                epochs=schedule.epochs,
                step=global_step,
                total_steps=schedule.total_steps,
                loss=losses[-1] if losses else None,
                lr=self.reported_lr,
                it_per_s=rate,
                eta_s=eta,
            )
        )


def _reason(exc: BaseException) -> str:
    known = as_user_error(exc) if isinstance(exc, Exception) else None
    return str(known) if known is not None else f"{type(exc).__name__}: {exc}"

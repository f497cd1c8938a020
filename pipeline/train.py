"""The Trainer: a DCGAN pair, each network in its own DeepSpeed engine, D step then G step.

Which ranks run it: every rank runs the same steps on its own slice of the data; DeepSpeed
all-reduces the gradients. The Trainer trains and checkpoints; what a run records (the run
folder, FID, MLflow) lives in the reporters it is given (pipeline/reporting/), which
pipeline/run.py chooses for each rank.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from pipeline import engines, losses
from pipeline.augment import diff_augment
from pipeline.checkpoint import Checkpointer, CheckpointParts, read_meta
from pipeline.config import Config
from pipeline.data.loader import ShardedLoader
from pipeline.dist import DistInfo
from pipeline.ema import EMA
from pipeline.errors import EXIT_REQUEUE, Preempted, UserError
from pipeline.export import save_generator
from pipeline.images import from_uint8
from pipeline.models import build_pair
from pipeline.random_state import derive_rng_state, rng_state, saved_device_type, set_rng_state
from pipeline.reporting import Reporter, due
from pipeline.step_window import StepMeans
from pipeline.stopping import Divergence, StopCheck

log = logging.getLogger("pipeline.train")


class Trainer:
    """Everything one training run holds, built once; `train()` runs the steps.

    Building a Trainer has no process-wide effects and writes nothing: it seeds no global
    random stream, installs no signal handler (train() does) and adds no log handler."""

    def __init__(
        self, config: Config, info: DistInfo, run_dir: Path, reporters: Sequence[Reporter] = (), resized: bool = False
    ):
        """run_dir: where checkpoints go. resized: this trainer will resume a checkpoint saved on
        another world size (the config already holds the new split: pipeline/resize.py)."""
        self.loader = ShardedLoader(config.data, config.seed, info.rank, info.world_size)
        _check_data_matches_model(config, self.loader.shape)
        config = with_classes(config, self.loader.manifest)
        self.config, self.info = config, info
        # The same initial weights on every rank, from config.seed (initialize also broadcasts
        # rank 0's). fork_rng: the seed applies to building the networks, not to the process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            generator, discriminator = build_pair(config.model)
        self.g_engine = engines.Engine("g", generator, config, load_universal=resized)
        self.d_engine = engines.Engine("d", discriminator, config, load_universal=resized)
        self.ema = (
            EMA(self.g_engine.module, config.train.ema_decay, config.train.ema_warmup) if config.train.ema else None
        )
        if config.train.compile:  # after the EMA's deepcopy: a copy of a compiled module would run the original
            self.g_engine.compile(config.train.compile_backend)
            self.d_engine.compile(config.train.compile_backend)
        # All randomness of a step comes from this per-rank generator: resumable, and distinct per rank.
        self.rng = torch.Generator(info.device).manual_seed(config.seed * 1_000_003 + info.rank + 1)
        self.global_step = 0
        self.window = StepMeans(info.device)  # this logging window's step figures, on the device
        self.stops = StopCheck(info.device, config.train.max_nonfinite_steps)
        self.checkpointer = Checkpointer(run_dir, config, info.rank, info.world_size)
        self.reporters = list(reporters)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def dtype(self) -> torch.dtype:
        return engines.compute_dtype(self.config)

    # ------------------------------------------------------------------ steps
    def d_layout(self, images: torch.Tensor) -> torch.Tensor:
        """D's input in the layout model.channels_last asks for: PyTorch's convolutions follow an
        NHWC input with NHWC kernels. With fp16, bf16 or ZeRO the weights stay NCHW, as DeepSpeed
        keeps them: its optimizers hold them in flat contiguous buffers. With fp32 at stage 0
        the weights are NHWC too (engines.Engine), which saves reordering each kernel per call."""
        return images.contiguous(memory_format=torch.channels_last) if self.config.model.channels_last else images

    def d_input(self, images: torch.Tensor) -> torch.Tensor:
        """What D sees of real or generated images: with train.augment, DiffAugment's transforms
        drawn from the step generator (pipeline/augment.py), in D's layout."""
        if self.config.train.augment:
            images = diff_augment(images, self.config.train.augment, self.rng)
        return self.d_layout(images)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, the classes to generate): classes uniform at random with model.conditional, else None."""
        z = torch.randn(n, self.config.model.latent_dim, generator=self.rng, device=self.device).to(self.dtype)
        classes = self.config.model.num_classes
        return z, torch.randint(classes, (n,), generator=self.rng, device=self.device) if classes else None

    def d_step(self, real: torch.Tensor, labels: torch.Tensor | None) -> dict:
        """One D micro-step on real and detached fake images: one loss, one backward.
        labels: the real images' classes with model.conditional, else None."""
        kind = self.config.loss.kind
        z, fake_labels = self.latents(real.shape[0])
        with torch.no_grad():
            fake = self.d_layout(self.g_engine.module(z, fake_labels))  # raw G: no hooks, no graph
        d_real = self.d_engine(self.d_input(real), labels).float()
        d_fake = self.d_engine(self.d_input(fake), fake_labels).float()
        loss = losses.d_loss(kind, d_real, d_fake)
        penalty = 0.0  # added to what D minimises; loss_D stays the game's value
        # The penalties differentiate D's input gradient: D's eager forward (a compiled one has
        # no double backward), and with fp16 that gradient taken at the loss scale.
        augment = self.d_input if self.config.train.augment else None  # the penalties' D sees what D's loss sees
        d_eager = functools.partial(_penalised, augment, self.d_engine.eager_forward, labels)
        scale = self.d_engine.loss_scale or 1.0
        if kind == "wgan-gp":
            gp = losses.gradient_penalty(d_eager, real, fake, self.rng, scale)
            loss = loss + self.config.loss.gp_weight * gp
        r1, every = self.config.loss.r1_gamma, self.config.loss.r1_every
        if r1 and self.global_step % every == 0:
            penalty = r1 / 2 * every * losses.r1_penalty(d_eager, real, scale)
        self.d_engine.backward(loss + penalty)
        norm = self.d_engine.step()
        return {
            "loss_D": loss.detach(),
            "D_x": losses.d_confidence(kind, d_real),
            "D_G_z": losses.d_confidence(kind, d_fake),
            "grad_norm_D": norm,
        }

    def g_step(self, batch_size: int) -> dict:
        """One G micro-step through D's raw module with D frozen: G's backward touches only G.

        Calling the D *engine* here would fire its backward hook inside g_engine.backward
        (DeepSpeed #7665), and unfrozen D params get gradients twice at ZeRO-2 (#4923)."""
        with self.d_engine.frozen():
            z, fake_labels = self.latents(batch_size)
            fake = self.d_input(self.g_engine(z, fake_labels))
            loss = losses.g_loss(self.config.loss.kind, self.d_engine.module(fake, fake_labels).float())
            self.g_engine.backward(loss)
            norm = self.g_engine.step()
        return {"loss_G": loss.detach(), "grad_norm_G": norm}

    def train_step(self, batches) -> dict:
        """One global step: n_critic D updates, then one G update (each over grad-accumulation
        micro-batches). Returns this rank's figures of the step, as device tensors, and adds them
        to the logging window: nothing here waits for the device (pipeline/step_window.py)."""
        waited, accumulation = 0.0, self.config.deepspeed.gradient_accumulation
        if self.config.train.lr_decay == "linear":  # a function of the step alone: resumes exactly
            train = self.config.train
            decay_steps = train.steps * (1.0 - train.lr_decay_start)
            remaining = min(1.0, (train.steps - self.global_step) / decay_steps)
            self.d_engine.set_learning_rate(train.d_optim.lr * remaining)
            self.g_engine.set_learning_rate(train.g_optim.lr * remaining)
        d_records = []
        for _ in range(self.config.loss.n_critic * accumulation):
            before = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - before
            pixels = batch.images.to(self.device, non_blocking=True)  # uint8 from pinned memory
            real = from_uint8(pixels, self.dtype, self.config.model.channels_last)
            d_records.append(self.d_step(real, self._labels(batch)))
        g_records = [self.g_step(self.config.data.batch_per_rank) for _ in range(accumulation)]
        if self.ema is not None and self.g_engine.step_applied:  # fp16 skips an overflowed update
            self.ema.update(self.g_engine.module)
        self.global_step += 1
        figures = _step_figures(d_records) | _step_figures(g_records)
        self.stops.add(figures["loss_D"], figures["loss_G"])
        self.window.add(figures, len(d_records) * self.config.data.batch_per_rank, waited)
        return figures

    def _labels(self, batch) -> torch.Tensor | None:
        """The batch's classes on the device, with model.conditional (with_classes checked the
        manifest names classes, and prepare writes a label for every sample of a labelled set)."""
        if not self.config.model.conditional:
            return None
        if batch.labels is None:
            raise UserError(f"model.conditional: data {self.config.data.shards} delivered a batch without labels")
        return batch.labels.to(self.device, non_blocking=True)

    def read_metrics(self) -> dict:
        """All ranks (a collective), on logging steps: the window's means over steps and ranks, and
        the engines' and process's state. Every rank gets the same step figures."""
        metrics = self.window.read(self.info.world_size)
        for net, engine in (("D", self.d_engine), ("G", self.g_engine)):
            metrics[f"loss_scale_{net}"] = engine.loss_scale
            metrics[f"skipped_steps_{net}"] = engine.skipped_steps
            metrics[f"lr_{net}"] = engine.learning_rate
        metrics["corrupt_samples"] = self.loader.corrupt_samples
        metrics["rss_mb"] = psutil.Process().memory_info().rss / 2**20
        if self.device.type == "cuda":
            metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return metrics

    def should_stop(self) -> bool:
        """All ranks (a collective), every train.sync_every steps: whether any rank got a preemption
        signal; raises NonFiniteLoss when any rank's losses stayed non-finite too long."""
        return self.stops.agree(self.global_step)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """All ranks: steps until train.steps, the reporters called between them. A preemption
        signal on any rank makes every rank checkpoint after the current step and raise
        Preempted (exit 75). Returns the last logging step's metrics."""
        train = self.config.train
        batches = self.loader.forever()
        self.stops.preemption.install()
        metrics: dict = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.closing(batches))  # loader workers stop on any exit
            for reporter in self.reporters:
                stack.callback(reporter.close)
                reporter.on_train_start(self)
            self.window.reset()  # the first record's speed counts from here, not from the set-up
            while self.global_step < train.steps:
                self.train_step(batches)
                step = self.global_step
                stop = self.should_stop() if due(step, train.sync_every, train.steps) else False  # every rank alike
                # A preempted run records its last, partial window too: nothing measured is lost.
                logged = self.read_metrics() if due(step, train.log_every, train.steps) or stop else None
                metrics = logged or metrics
                started = time.perf_counter()  # what follows is not training: left out of the speed
                self._report("after_step", logged)
                wanted = self.checkpointer.due(step) or any(r.wants_checkpoint(step) for r in self.reporters)
                saved = self.save_checkpoint(stopping=stop) if stop or wanted else None
                self.window.exclude(time.perf_counter() - started)
                if stop:
                    raise Preempted(
                        f"preemption signal at step {step}: checkpoint {saved} saved on every rank; "
                        f"exit {EXIT_REQUEUE} asks the scheduler to requeue (resume with --resume auto)"
                    )
            self._report("on_train_end")
        return metrics

    def _report(self, event: str, *args) -> None:
        for reporter in self.reporters:
            getattr(reporter, event)(self, *args)

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, stopping: bool = False) -> Path:
        """All ranks: a checkpoint of this step; then the reporters hear of it."""
        meta = {"epoch": self.loader.epoch}
        path = self.checkpointer.save(self.global_step, self._checkpoint_parts(), meta)
        self._report("after_checkpoint", path, self.checkpointer.last_save_seconds, stopping)
        return path

    def resume(self, path: Path, meta: dict | None = None) -> dict:
        """All ranks: continue from a checkpoint (meta: its read_meta, when the caller has it)."""
        meta = meta if meta is not None else read_meta(path)
        resized = meta["world_size"] != self.info.world_size
        if resized and not self.g_engine.load_universal:
            raise UserError(
                f"checkpoint {path} was saved on {meta['world_size']} ranks, this job has {self.info.world_size}: "
                "build the trainer with build_trainer (pipeline/run.py; `pipeline train --resume` does), "
                "which splits the batch anew"
            )
        self.checkpointer.load(path, self._checkpoint_parts(), meta)
        if resized:  # every rank loaded rank 0's state: its streams belonged to ranks that may be gone
            derive_rng_state(self.config.seed, self.global_step, self.info.rank, self.rng)
        return meta

    def _checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(
            engines={"g": self.g_engine, "d": self.d_engine},
            rank_state=self,
            shared={"ema": self.ema} if self.ema is not None else {},
        )

    def state_dict(self) -> dict:
        """This rank's state for an exact resume, beside the engines and the EMA (the
        checkpointer saves those as parts of their own)."""
        return {
            "global_step": self.global_step,
            "nonfinite_streak": int(self.stops.divergence.streak),
            "loader": self.loader.state_dict(),
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's state; after a resize, rank 0's (the checkpointer passes it to every rank)."""
        self.global_step = state["global_step"]
        self.stops.divergence = Divergence(self.device, state["nonfinite_streak"])
        self.loader.load_state_dict(state["loader"])
        saved_device = saved_device_type(state["rng"])
        if saved_device == self.device.type:
            set_rng_state(state["rng"], self.rng)
            return
        derive_rng_state(self.config.seed, self.global_step, self.info.rank, self.rng)
        if self.info.is_main:
            log.warning(
                "the checkpoint's random streams are %s's and this run is on %s: they are derived anew from "
                "(seed, step, rank), so the continuation is not the one the %s run would have taken",
                saved_device,
                self.device.type,
                saved_device,
            )

    # ---------------------------------------------------------------- outputs
    def sampling_generator(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.g_engine.module

    def export_generator(self, path: Path) -> Path:
        return save_generator(
            path, self.sampling_generator(), self.config.model, self.global_step, self.ema is not None
        )


def _penalised(d_input, discriminator, labels, images: torch.Tensor) -> torch.Tensor:
    """D as the gradient penalties differentiate it: of the augmented images with train.augment
    (d_input), given the real images' classes with model.conditional."""
    return discriminator(d_input(images) if d_input is not None else images, labels)


def with_classes(config: Config, manifest: dict | None) -> Config:
    """The config with model.num_classes settled from the shards' manifest (model.conditional),
    so the checkpoints, exports and tracked params record it. A dataset without labels is refused."""
    model = config.model
    if not model.conditional:
        return config
    labels = (manifest or {}).get("labels") or {}
    classes = labels.get("num_classes")
    if not isinstance(classes, int) or classes < 2:
        raise UserError(
            f"model.conditional needs class labels and data {config.data.shards} has none (its manifest names "
            "no classes): prepare it from a labelled source, or train unconditionally"
        )
    if model.num_classes is not None and model.num_classes != classes:
        raise UserError(f"model.num_classes is {model.num_classes} but data {config.data.shards} has {classes} classes")
    return config.model_copy(update={"model": model.model_copy(update={"num_classes": classes})})


def _check_data_matches_model(config: Config, shape: tuple | None) -> None:
    model = config.model
    if shape is not None and shape != (model.resolution, model.resolution, model.channels):
        raise UserError(
            f"data {config.data.shards} holds {shape[0]}x{shape[1]} images with {shape[2]} channel(s) "
            f"but model.resolution={model.resolution}, model.channels={model.channels}"
        )


def _step_figures(records: list[dict]) -> dict:
    """One network's figures of a step from its micro-steps: losses and D outputs averaged (on
    the device), the gradient norm of the update (the last one measured)."""
    figures = {}
    for key in records[0]:
        values = [r[key] for r in records if r[key] is not None]
        if key.startswith("grad_norm"):
            figures[key] = values[-1] if values else None
        else:
            figures[key] = values[0] if len(values) == 1 else torch.stack(values).mean()
    return figures

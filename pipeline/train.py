"""The Trainer: a DCGAN pair, each network in its own DeepSpeed engine, D step then G step.

Which ranks run it: every rank runs the same steps on its own slice of the data; DeepSpeed
all-reduces the gradients. Rank 0 alone writes the run folder, the progress line, the
metrics and the sample grids.

    python -m pipeline train --config configs/mnist32.yaml                     # one process
    deepspeed --num_gpus 2 --module pipeline train --config configs/mnist32.yaml
    torchrun --nproc_per_node 2 -m pipeline train --config configs/mnist32.yaml
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import engines, losses
from pipeline.checkpoint import Checkpointer, CheckpointParts, latest_checkpoint, read_meta
from pipeline.config import Config, config_to_yaml
from pipeline.data.loader import ShardedLoader
from pipeline.dist import DistInfo
from pipeline.elastic import Resize, plan_resize, resized_config
from pipeline.ema import EMA
from pipeline.errors import EXIT_REQUEUE, PREEMPTION_SIGNALS, NonFiniteLoss, Preempted, UserError
from pipeline.export import generate, generator_payload, save_generator
from pipeline.files import read_json_lines, write_bytes_atomic
from pipeline.images import from_uint8, save_grid
from pipeline.metric_names import sectioned
from pipeline.metrics import Divergence, StepMeans, agree
from pipeline.models import build_pair
from pipeline.random_state import derive_rng_state, rng_state, saved_device_type, set_rng_state
from pipeline.tracking import NullTracker, flatten, make_tracker, safe_overrides, start_system_metrics
from pipeline.versions import versions

log = logging.getLogger("pipeline.train")
GENERATOR_EXPORT = "generator.pt"
FID_LOG = "fid.jsonl"


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop acts on it between steps on all ranks.

    Which ranks: installed on every rank. A signal to any one rank reaches all of them through
    the all-reduce of Trainer.settle, within train.sync_every steps (README, "Preemption"); a
    second signal during the save only sets the flag again."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Kept until the CLI's teardown, which then ignores these signals: a signal that
        lands while a preempted rank shuts down (the deepspeed launcher SIGTERMs the
        survivors) must not kill it mid-exit."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self)
        return self


class Trainer:
    """Everything one training run holds, built once; `train()` runs the steps.

    Building a Trainer has no process-wide effects: it seeds no global random stream,
    installs no signal handler (train() does) and adds no log handler (run_training's
    run_log does)."""

    def __init__(self, config: Config, info: DistInfo, run_dir: Path, tracker=None, resize: Resize | None = None):
        """resize: this trainer will resume a checkpoint saved on another world size (the config
        already holds the new split: pipeline/elastic.py)."""
        self.config, self.info, self.device = config, info, info.device
        self.resize = resize
        self.dtype = engines.compute_dtype(config)
        self.loader = ShardedLoader(config.data, config.seed, info.rank, info.world_size)
        self._check_data_matches_model()
        model = config.model
        # The same initial weights on every rank, from config.seed (initialize also broadcasts
        # rank 0's). fork_rng: the seed applies to building the networks, not to the process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            generator, discriminator = build_pair(model)
        self.g_engine = engines.Engine("g", generator, config, load_universal=resize is not None)
        self.d_engine = engines.Engine("d", discriminator, config, load_universal=resize is not None)
        self.ema = None
        if config.train.ema:
            self.ema = EMA(self.g_engine.module, config.train.ema_decay, config.train.ema_warmup)
        if config.train.compile:  # after the EMA's deepcopy: a copy of a compiled module would run the original
            self.g_engine.compile(config.train.compile_backend)
            self.d_engine.compile(config.train.compile_backend)
        # All randomness of a step comes from this per-rank generator: resumable, and distinct per rank.
        self.rng = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + info.rank + 1)
        fixed = torch.Generator().manual_seed(config.seed)
        self.fixed_z = torch.randn(config.train.sample_count, model.latent_dim, generator=fixed).to(self.device)
        self.global_step = 0
        self.window = StepMeans(self.device)  # this logging window's step figures, on the device
        self.divergence = Divergence(self.device)
        self.preemption = PreemptionFlag()
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.checkpointer = Checkpointer(self.run_dir, config, info.rank, info.world_size)
        self.checkpoint_parts = CheckpointParts(
            engines={"g": self.g_engine, "d": self.d_engine},
            rank_state=self,
            shared={"ema": self.ema} if self.ema is not None else {},
        )
        self.fid = None  # FidEvaluator: loads Inception and the reference statistics, only when FID is on
        if config.eval.fid_every:
            from pipeline.evaluation.fid import FidEvaluator

            self.fid = FidEvaluator(config, self.device, config.train.progress)
        self.best_fid: tuple[float, int] | None = None  # (fid, step), rank 0
        self.last_fid: dict | None = None  # the newest evaluation's result, for the end-of-run verdict
        self.model_logged_step: int | None = None  # rank 0: the step of the last generator given to MLflow
        self._prepare_run_dir()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """This rank's state for an exact resume, beside the engines and the EMA (the
        checkpointer saves those as parts of their own). The best FID is not here: it is
        read back from fid.jsonl, which also holds the evaluation of the checkpoint's own
        step (run after the save)."""
        return {
            "global_step": self.global_step,
            "nonfinite_streak": int(self.divergence.streak),
            "loader": self.loader.state_dict(),
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's state; after a resize, rank 0's (the checkpointer passes it to every rank)."""
        self.global_step = state["global_step"]
        self.divergence = Divergence(self.device, state["nonfinite_streak"])
        self.loader.load_state_dict(state["loader"])
        saved_device = saved_device_type(state["rng"])
        if self.resize is None and saved_device == self.device.type:
            set_rng_state(state["rng"], self.rng)
        else:  # the saved streams were per old rank, or another device's: derive this rank's anew
            derive_rng_state(self.config.seed, self.global_step, self.info.rank, self.rng)
        if saved_device != self.device.type and self.info.is_main:
            log.warning(
                "the checkpoint's random streams are %s's and this run is on %s: they are derived anew from "
                "(seed, step, rank), so the continuation is not the one the %s run would have taken",
                saved_device,
                self.device.type,
                saved_device,
            )
        if self.resize is not None and not self.info.is_main:
            self.loader.corrupt_samples = 0  # rank 0's count stays with rank 0

    # ----------------------------------------------------------------- set-up
    def _check_data_matches_model(self) -> None:
        shape = self.loader.shape
        model = self.config.model
        if shape is not None and shape != (model.resolution, model.resolution, model.channels):
            raise UserError(
                f"data {self.config.data.shards} holds {shape[0]}x{shape[1]} images with {shape[2]} channel(s) "
                f"but model.resolution={model.resolution}, model.channels={model.channels}"
            )

    def _prepare_run_dir(self) -> None:
        """Rank 0 writes the run folder's set-up files."""
        if self.info.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
            for engine in (self.g_engine, self.d_engine):
                (self.run_dir / f"ds_config_{engine.name}.json").write_text(json.dumps(engine.ds_config, indent=2))

    def d_layout(self, images: torch.Tensor) -> torch.Tensor:
        """D's input in the layout model.channels_last asks for: PyTorch's convolutions follow an
        NHWC input with NHWC kernels. With fp16, bf16 or ZeRO the weights stay NCHW, as DeepSpeed
        keeps them: its optimizers hold them in flat contiguous buffers. With fp32 at stage 0
        the weights are NHWC too (engines.Engine), which saves reordering each kernel per call."""
        return images.contiguous(memory_format=torch.channels_last) if self.config.model.channels_last else images

    def latents(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.config.model.latent_dim, generator=self.rng, device=self.device)
        return z.to(self.dtype)

    # ------------------------------------------------------------------ steps
    def d_step(self, real: torch.Tensor) -> dict:
        """One D micro-step on real and detached fake images: one loss, one backward."""
        kind = self.config.loss.kind
        with torch.no_grad():
            fake = self.d_layout(self.g_engine.module(self.latents(real.shape[0])))  # raw G: no hooks, no graph
        d_real = self.d_engine(real).float()
        d_fake = self.d_engine(fake).float()
        loss = losses.d_loss(kind, d_real, d_fake)
        penalty = 0.0  # added to what D minimises; loss_D stays the game's value
        # The penalties differentiate D's input gradient: D's eager forward (a compiled one has
        # no double backward), and with fp16 that gradient taken at the loss scale.
        d_eager, scale = self.d_engine.eager_forward, self.d_engine.loss_scale or 1.0
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
            fake = self.d_layout(self.g_engine(self.latents(batch_size)))
            loss = losses.g_loss(self.config.loss.kind, self.d_engine.module(fake).float())
            self.g_engine.backward(loss)
            norm = self.g_engine.step()
        return {"loss_G": loss.detach(), "grad_norm_G": norm}

    def train_step(self, batches) -> dict:
        """One global step: n_critic D updates, then one G update (each over grad-accumulation
        micro-batches). Returns this rank's figures of the step, as device tensors, and adds them
        to the logging window: nothing here waits for the device (pipeline/metrics.py)."""
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
            d_records.append(self.d_step(from_uint8(pixels, self.dtype, self.config.model.channels_last)))
        g_records = [self.g_step(self.config.data.batch_per_rank) for _ in range(accumulation)]
        if self.ema is not None and self.g_engine.step_applied:  # fp16 skips an overflowed update
            self.ema.update(self.g_engine.module)
        self.global_step += 1
        figures = _step_figures(d_records) | _step_figures(g_records)
        self.divergence.add(figures["loss_D"], figures["loss_G"])
        self.window.add(figures, len(d_records) * self.config.data.batch_per_rank, waited)
        return figures

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

    def settle(self) -> bool:
        """All ranks (a collective), every train.sync_every steps: whether any rank got a preemption
        signal, and a stop when any rank's losses stayed non-finite too long."""
        signalled, longest = agree(self.preemption.signum is not None, self.divergence)
        limit = self.config.train.max_nonfinite_steps
        if longest >= limit:
            raise NonFiniteLoss(
                f"losses non-finite for {longest} consecutive steps (found at step {self.global_step}, "
                f"limit train.max_nonfinite_steps={limit}); training diverged. "
                "Lower the learning rates, use fp32/bf16, or enable gradient clipping."
            )
        return signalled

    # ------------------------------------------------------------------ loop
    def resume(self, path: Path, meta: dict | None = None) -> dict:
        """All ranks: continue from a checkpoint (meta: its read_meta, when the caller has it);
        rank 0 drops metrics logged after it."""
        meta = meta if meta is not None else read_meta(path)
        saved_world = meta["world_size"]
        if saved_world != self.info.world_size and self.resize is None:
            raise UserError(
                f"checkpoint {path} was saved on {saved_world} ranks, this job has {self.info.world_size}: "
                "build the trainer with build_trainer (as `pipeline train --resume` does), which splits the batch anew"
            )
        self.checkpointer.load(path, self.checkpoint_parts, meta)
        if self.info.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.global_step, meta["epoch"])
            if self.resize is not None:
                log.info(self.resize.describe(self.global_step))
            self._truncate_log(self.run_dir / "metrics.jsonl")
            scored = [(r["fid"], r["step"]) for r in self._truncate_log(self.run_dir / FID_LOG)]
            self.best_fid = min(scored) if scored else None
        return meta

    def _truncate_log(self, path: Path) -> list[dict]:
        """Rank 0: drop the records of a JSON-lines log written after the resumed step, and a
        torn last line (what a kill mid-write leaves), rewriting the file atomically."""
        if not path.exists():
            return []
        records = read_json_lines(path)
        kept = [r for r in records if r["step"] <= self.global_step]
        write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def start_tracking(
        self, run_id: str | None = None, overrides: list[str] | None = None, config_name: str | None = None
    ) -> None:
        """Rank 0: open the MLflow run (the checkpoint's run when resuming) and log the set-up.
        overrides: the command line's KEY=VALUE words, kept as the tag `overrides`; with
        config_name they name the run unless tracking.run_name or train.run_name does."""
        if not self.info.is_main:
            return
        tracking = self.config.tracking
        found = versions()
        tags = {
            "run_dir": str(self.run_dir.resolve()),
            "launcher": self.info.launcher,
            **identity_tags(self.config, self.info, found.get("git_commit"), overrides or []),
            **tracking.tags,
        }
        if overrides:
            tags["overrides"] = safe_overrides(overrides)  # safe_params then drops credentials in URLs
        named = config_name is not None and not self.config.train.run_name
        self.tracker.start(
            tracking.run_name or (run_title(config_name, overrides or []) if named else self.run_dir.name),
            run_id=run_id,
            tags=tags,
            system_metrics=system_metrics_on(tracking, self.device),
        )
        if self.fid is not None:
            self.tracker.set_tags(
                {
                    "fid.n_reference": self.fid.reference.n,
                    "fid.reference": json.dumps(self.fid.reference.describe),
                    "fid.protocol": json.dumps(self.fid.extractor.protocol),
                }
            )
        if run_id:
            self.tracker.set_tags({"resumed_at_step": self.global_step})
            self.tracker.sync(self.run_dir, self.global_step)  # what an earlier job could not deliver
            if self.resize is not None:  # params are fixed at the run's start: the change is a tag and a metric
                self.tracker.set_tags(
                    {
                        "world_size": self.info.world_size,
                        "world_size_changed_at_step": self.global_step,
                        "resize": self.resize.describe(self.global_step),
                    }
                )
                self.tracker.log_metrics({"world_size": self.info.world_size}, self.global_step)
            return
        manifest = self.loader.manifest or {}
        commit = found.pop("git_commit", None)
        params = {
            **flatten(self.config.model_dump(mode="json"), "config."),
            **flatten(self.g_engine.ds_config, "ds_g."),
            **flatten(self.d_engine.ds_config, "ds_d."),
            "world_size": self.info.world_size,
            "nodes": self.info.nodes,
            "device": self.device.type,
            "launcher": self.info.launcher,
            **{f"version.{k}": v for k, v in found.items()},
            **({"git_commit": commit} if commit else {}),
            "data.count": manifest.get("count"),
            "data.resolution": manifest.get("resolution"),
            "data.channels": manifest.get("channels"),
            "data.manifest_sha256": manifest.get("_hash"),
        }
        self.tracker.log_params(params)
        self.tracker.log_metrics({"world_size": self.info.world_size}, self.global_step)  # a resize logs its own
        self._log_datasets()
        for name in ("config.yaml", "ds_config_g.json", "ds_config_d.json"):
            self.tracker.log_artifact(self.run_dir / name, "config")

    def training_dataset(self) -> tuple[str, str, str]:
        """(name, digest, source) of the training data as MLflow records it."""
        data, manifest = self.config.data, self.loader.manifest
        if manifest is not None:
            return dataset_name(str(manifest["_path"]), data.split), manifest["_hash"], str(manifest["_path"])
        # a URL pattern: identified by its shards and their sample counts
        listing = json.dumps(list(zip(self.loader.urls, self.loader.layout.counts, strict=True)))
        return dataset_name(data.shards, data.split), hashlib.sha256(listing.encode()).hexdigest(), data.shards

    def _log_datasets(self) -> None:
        """Rank 0: the training data, and the FID reference set, as MLflow dataset inputs."""
        data = self.config.data
        name, digest, source = self.training_dataset()
        model = self.config.model
        profile = {"num_samples": self.loader.layout.total, "resolution": model.resolution, "channels": model.channels}
        self.tracker.log_dataset(name, digest, str(source), "training", profile | {"split": data.split})
        if self.fid is not None:
            reference = self.fid.reference.describe
            self.tracker.log_dataset(
                dataset_name(reference["source"], reference.get("split")),
                reference.get("manifest_sha256") or hashlib.sha256(reference["source"].encode()).hexdigest(),
                reference["source"],
                "evaluation",
                {"num_samples": reference["n"], "split": reference.get("split")},
            )

    def save_checkpoint(self) -> Path:
        """All ranks. Its time is left out of the logging window's speed and logged as checkpoint_seconds."""
        started = time.perf_counter()
        meta = {"epoch": self.loader.epoch, "tracking_run_id": self.tracker.run_id}
        path = self.checkpointer.save(self.global_step, self.checkpoint_parts, meta)
        if self.info.is_main:
            log.info("checkpoint %s (%.1f s)", path, self.checkpointer.last_save_seconds)
            self.tracker.set_tags({"checkpoint.latest": str(path.resolve()), "checkpoint.step": self.global_step})
            self.tracker.log_metrics({"checkpoint_seconds": self.checkpointer.last_save_seconds}, self.global_step)
        self.window.exclude(time.perf_counter() - started)
        return path

    def train(self) -> dict:
        """All ranks: steps until train.steps; rank 0 records. A preemption signal on any rank
        makes every rank checkpoint after the current step and raise Preempted (exit 75)."""
        train = self.config.train
        if self.info.is_main:
            log.info("run folder %s; %s", self.run_dir, self.info.summary())
        batches = self.loader.forever()
        self.preemption.install()
        self.window.reset()  # the first record's speed counts from here, not from the set-up
        metrics: dict = {}
        with self._recorder() as record, contextlib.closing(batches):  # closing: loader workers stop on any exit
            while self.global_step < train.steps:
                self.train_step(batches)
                stop = self.settle() if self._due(train.sync_every) else False  # the same on every rank
                # A preempted run records its last, partial window too: nothing measured is lost.
                logged = self.read_metrics() if self._due(train.log_every) or stop else None
                record(logged)
                metrics = logged or metrics
                if stop:
                    path = self.save_checkpoint()
                    raise Preempted(
                        f"preemption signal at step {self.global_step}: checkpoint {path} saved on every rank; "
                        f"exit {EXIT_REQUEUE} asks the scheduler to requeue (resume with --resume auto)"
                    )
                saved = self.save_checkpoint() if self._due(train.checkpoint_every) else None
                if self.fid is not None and self._due(self.config.eval.fid_every):
                    self.evaluate_fid(saved or self.save_checkpoint())
        if self.info.is_main:
            self.tracker.log_artifact(self.export_generator(self.run_dir / GENERATOR_EXPORT), "model")
            if self.model_logged_step != self.global_step:  # a new best at this step was logged already
                final_fid = self.last_fid if self.last_fid and self.last_fid["step"] == self.global_step else None
                self.log_model(final_fid)
            latest = self.checkpointer.latest()
            if self.config.tracking.upload_final_checkpoint and latest is not None:
                self.tracker.log_artifact(latest, f"checkpoints/{latest.name}")
        return metrics

    def evaluate_fid(self, checkpoint: Path) -> dict:
        """All ranks generate and extract their share; rank 0 records the result and marks the
        checkpoint of this step as best when its FID is the lowest so far. The checkpoint is
        saved before the (long) evaluation, so a kill during it loses nothing."""
        started = time.perf_counter()
        result = self.fid(self.sampling_generator())
        self.window.exclude(time.perf_counter() - started)  # logged as fid_seconds, not as a slow step
        self.last_fid = result | {"step": self.global_step}
        if self.info.is_main:
            record = {"step": self.global_step, "checkpoint": checkpoint.name, **result}
            with open(self.run_dir / FID_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tracker.log_metrics(
                {k: result[k] for k in ("fid", "kid", "fid_floor", "fid_over_floor") if k in result}
                | {"fid_seconds": result["seconds"]},
                self.global_step,
            )
            if self.best_fid is None or result["fid"] < self.best_fid[0]:
                self.best_fid = (result["fid"], self.global_step)
                self.checkpointer.mark_best(checkpoint)
                self.log_model(result)
                self.tracker.set_tags(
                    {
                        "best_fid": f"{result['fid']:.4f}",
                        "best_fid_step": self.global_step,
                        "checkpoint.best": str(checkpoint.resolve()),
                    }
                )
                self.tracker.log_metrics({"best_fid": result["fid"]}, self.global_step)  # sortable in the runs table
                self.tracker.update_parent()
            log.info(
                "step %d FID %.3f%s (n_generated=%d, n_reference=%d, %.0f s); best %.3f at step %d",
                self.global_step,
                result["fid"],
                f" KID {result['kid']:.5f}" if "kid" in result else "",
                result["n_generated"],
                result["n_reference"],
                result["seconds"],
                *self.best_fid,
            )
        return result

    def _due(self, every: int) -> bool:
        return self.global_step % every == 0 or self.global_step == self.config.train.steps

    @contextlib.contextmanager
    def _recorder(self):
        """Rank 0: progress line, metrics.jsonl, train.log and sample grids. Other ranks: nothing."""
        if not self.info.is_main:
            yield lambda metrics: None
            return
        train = self.config.train
        bar = tqdm(
            total=train.steps,
            initial=self.global_step,
            unit="step",
            desc="train",
            mininterval=1.0,
            disable=not train.progress,
        )
        with open(self.run_dir / "metrics.jsonl", "a") as metrics_file:

            def record(metrics: dict | None) -> None:
                """Each step: the progress bar, and the sample grid when due; with a logging step's metrics, those."""
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix_str(_progress(metrics), refresh=False)
                    metrics_file.write(json.dumps({"step": self.global_step, **sectioned(metrics)}) + "\n")
                    metrics_file.flush()
                    self.tracker.log_metrics(metrics, self.global_step)
                    log.info("step %d/%d %s", self.global_step, train.steps, _progress(metrics))
                if self._due(train.sample_every):
                    self.tracker.log_image(self.save_samples(), "samples", self.global_step)

            if self.global_step == 0:  # the grid before training: MLflow's image card opens on a step that has one
                self.tracker.log_image(self.save_samples(), "samples", 0)
            try:
                yield record
            finally:
                bar.close()

    # ---------------------------------------------------------------- outputs
    def sampling_generator(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.g_engine.module

    def save_samples(self) -> Path:
        """Rank 0: a grid from the fixed latent batch, so grids are comparable across steps."""
        images = generate(self.sampling_generator(), self.fixed_z)
        return save_grid(images, self.run_dir / "samples" / f"step_{self.global_step:07d}.png")

    def log_model(self, fid: dict | None) -> None:
        """Rank 0: queue the sampling generator (EMA) of this step as an MLflow model, tagged with
        its FID when it was scored at this step. The tracker's thread exports and uploads it."""
        generator = self.sampling_generator()
        payload = generator_payload(
            generator.state_dict(), self.config.model.model_dump(), self.global_step, self.ema is not None
        )
        tags = {"step": self.global_step, "dataset_digest": self.training_dataset()[1]}
        if fid is not None:
            tags |= {key: f"{fid[key]:.4f}" for key in ("fid", "fid_over_floor") if key in fid}
            tags["fid_n_generated"] = fid["n_generated"]
        self.tracker.log_model(payload, tags)
        self.model_logged_step = self.global_step

    def export_generator(self, path: Path) -> Path:
        return save_generator(
            path, self.sampling_generator(), self.config.model, self.global_step, self.ema is not None
        )


def dataset_name(source: str, split: str | None) -> str:
    """How a dataset input is named in MLflow, for training and evaluation alike: the folder of
    its manifest (or the shard pattern's file name) and the split, e.g. `mnist32_test:train`."""
    path = Path(source)
    name = path.parent.name if path.name == "manifest.json" else path.name
    return f"{name}:{split}" if split else name


# Overrides that say where or how a run goes, not what it trains: left out of its name.
PLUMBING = ("tracking.", "train.run_", "train.progress", "train.device", "data.shards", "data.workers", "data.prefetch")


def run_title(config_name: str, overrides: list[str]) -> str:
    """The MLflow run name: the config's name and the overrides that change what it trains, keys
    without their section (`mnist32 g_optim.lr=1e-3 seed=1`), so runs read apart in the UI's
    narrow legends where a timestamped folder name was cut to `mnist32-20261...`."""
    changes = [o for o in overrides if "=" in o and not o.startswith(PLUMBING)]
    short = [o.split(".", 1)[1] if o.split("=", 1)[0].count(".") else o for o in changes]
    return " ".join([config_name, *safe_overrides(short).split()])[:250]


def identity_tags(config: Config, info: DistInfo, commit: str | None, overrides: list[str]) -> dict:
    """MLflow's own tags for who ran what, which fill the UI's "Created by" and "Source", and the
    run's one-line description (mlflow.note.content)."""
    import getpass
    import sys

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid in some containers
        user = None
    m, ds = config.model, config.deepspeed
    description = (
        f"{m.arch.upper()} {m.resolution}x{m.resolution}x{m.channels} on {config.data.shards}, "
        f"{config.loss.kind} loss, {ds.precision} ZeRO-{ds.zero_stage}, {info.world_size} rank(s), "
        f"{config.train.steps} steps"
    )
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": " ".join(["pipeline", *sys.argv[1:2]]) or "pipeline",
        "mlflow.note.content": description,
    }
    if user:
        tags["mlflow.user"] = user
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


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


def _progress(metrics: dict) -> str:
    return (
        f"img/s={metrics['images_per_s']:.0f} loss_D={metrics['loss_D']:.3f} loss_G={metrics['loss_G']:.3f} "
        f"D(x)={metrics['D_x']:.3f} D(G(z))={metrics['D_G_z']:.3f}"
    )


def resolve_run(config: Config, config_name: str, resume: str) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from). Rank 0 decides; run_training broadcasts it.

    --resume none: a new run; refused if the folder already holds checkpoints (never
    overwrite a run). auto: the newest complete checkpoint of the run folder, or a fresh
    start when there is none (a stable train.run_name is required). PATH: that checkpoint,
    continuing in the run folder that holds it."""
    train = config.train
    if resume not in ("none", "auto"):
        path = Path(resume)
        if path.name == "latest" and path.is_file():  # checkpoints/latest: the checkpoint it names
            path = path.parent / path.read_text().strip()
        if (path / "checkpoints").is_dir():  # a run folder: its newest complete checkpoint
            path = latest_checkpoint(path)
            if path is None:
                raise UserError(f"--resume {resume}: the run folder holds no complete checkpoint")
        read_meta(path)
        return path.parent.parent, path
    if resume == "auto" and not train.run_name:
        raise UserError(
            "--resume auto needs a stable run folder: set train.run_name (slurm/train.sbatch uses the job name)"
        )
    name = train.run_name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = Path(train.run_root) / name
    latest = latest_checkpoint(run_dir)
    if resume == "none" and latest is not None:
        raise UserError(
            f"run folder {run_dir} already holds checkpoints (newest {latest.name}); pass --resume auto to "
            "continue it, or choose another train.run_name"
        )
    return run_dir, latest


@contextlib.contextmanager
def run_log(run_dir: Path, is_main: bool):
    """Rank 0: the `pipeline` loggers also write to RUN/train.log while the block runs."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def build_trainer(config: Config, info: DistInfo, run_dir: Path, checkpoint: Path | None, tracker=None):
    """All ranks: (the trainer, the checkpoint's meta or {}), resumed from `checkpoint` when one
    is given, on this world size whatever the checkpoint's (pipeline/elastic.py)."""
    meta = read_meta(checkpoint) if checkpoint is not None else {}
    resize = plan_resize(meta, config, info.world_size) if checkpoint is not None else None
    if resize is not None:
        config = resized_config(config, resize)
    trainer = Trainer(config, info, run_dir, tracker, resize)
    return trainer, (trainer.resume(checkpoint, meta) if checkpoint is not None else {})


def system_metrics_on(tracking, device: torch.device) -> bool:
    """tracking.system_metrics: auto is on for GPU runs."""
    return device.type == "cuda" if tracking.system_metrics == "auto" else bool(tracking.system_metrics)


def start_node_sampler(tracking, info: DistInfo, tracker):
    """Every rank. On a multi-node job with system metrics on (the config, device and node count
    are every rank's alike, so all ranks skip together otherwise), rank 0 tells the others its run
    and store (a collective). Local rank 0 of each node but rank 0's starts MLflow's
    system-metrics sampler for its node into that run, and returns it (None elsewhere). Only with
    an http(s) store: an sqlite file is no place for writers on several nodes, so then rank 0's
    node alone is sampled, as rank 0 logs."""
    if not (system_metrics_on(tracking, info.device) and info.nodes > 1):
        return None  # no start-up collective for the common case
    shared = [tracker.run_id, tracker.uri]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared
    if not run_id:  # tracking off on rank 0
        return None
    remote = uri.split(":", 1)[0] in ("http", "https")
    if info.is_main and not remote:
        log.warning("system metrics: only node 0 is sampled; the other nodes need an http store (mlflow server)")
    if not remote or info.is_main or info.local_rank != 0:
        return None
    return start_system_metrics(tracking, run_id, uri)


def run_training(config: Config, config_name: str, resume: str = "none", overrides: list[str] | None = None) -> int:
    """Entry of `pipeline train` on every rank. Rank 0 settles the run folder and checks the
    tracking store before any training work; a problem there stops every rank."""
    from pipeline.dist import detect

    info = detect(config.train.device)
    log.info(info.mapping())
    if info.is_main:
        log.info("topology: %s", info.summary())
    engines.init_distributed(info, config.deepspeed.timeout_minutes)
    decision: list = [None]
    tracker = NullTracker()
    if info.is_main:
        try:
            decision = [resolve_run(config, config_name, resume)]
            tracker = make_tracker(config.tracking, config.train.run_root, info.is_main)
        except UserError as exc:
            decision = [exc]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], UserError):
        raise decision[0]
    run_dir, checkpoint = decision[0]
    with run_log(run_dir, info.is_main):
        trainer, meta = build_trainer(config, info, run_dir, checkpoint, tracker)
        trainer.start_tracking(meta.get("tracking_run_id"), overrides, config_name)
        sampler = start_node_sampler(config.tracking, info, tracker)
        try:  # the tracker's end state; the CLI's teardown destroys the process group on every path
            metrics = trainer.train()
        except Preempted:
            tracker.finish("KILLED")
            raise
        except BaseException as exc:
            tracker.finish("FAILED", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if sampler is not None:
                sampler.finish()
        tracker.finish("FINISHED")
    if info.is_main:
        if tracker.where():
            log.info(tracker.where())
        print(
            json.dumps(
                {
                    "run_dir": str(trainer.run_dir),
                    "step": trainer.global_step,
                    "mlflow_run_id": tracker.run_id,
                    **{k: metrics.get(k) for k in ("loss_D", "loss_G", "D_x", "D_G_z")},
                }
            )
        )
        if trainer.last_fid is not None:
            from pipeline.evaluation.fid import verdict

            print(f"step {trainer.global_step}: {verdict(trainer.last_fid)}")
    dist.barrier()  # every rank is past its last collective before rank 0 (the rendezvous store) ends
    return 0

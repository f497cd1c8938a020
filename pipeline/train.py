"""The Trainer: a DCGAN pair, each network in its own DeepSpeed engine, D step then G step.

Which ranks run it: every rank runs the same steps on its own slice of the data; DeepSpeed
all-reduces the gradients. Rank 0 alone writes the run folder, the progress line, the
metrics and the sample grids.

    python -m pipeline train --config configs/mnist32.yaml                     # one process
    deepspeed --num_gpus 2 --module pipeline train --config configs/mnist32.yaml
    torchrun --nproc_per_node 2 -m pipeline train --config configs/mnist32.yaml
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import engines, losses
from pipeline.config import Config, config_to_yaml
from pipeline.data.loader import ShardedLoader
from pipeline.dist import DistInfo
from pipeline.ema import EMA
from pipeline.errors import UserError
from pipeline.export import save_generator
from pipeline.images import save_grid
from pipeline.models.dcgan import Discriminator, Generator

log = logging.getLogger("pipeline.train")
GENERATOR_EXPORT = "generator.pt"


class NonFiniteLoss(UserError):
    """Training diverged: the losses stayed NaN/inf for max_nonfinite_steps steps."""

    exit_code = 3


class Trainer:
    def __init__(self, config: Config, info: DistInfo, config_name: str = "run"):
        self.config, self.info, self.device = config, info, info.device
        self.dtype = engines.compute_dtype(config)
        torch.manual_seed(config.seed)  # same init on every rank (initialize also broadcasts rank 0's)
        self.loader = ShardedLoader(config.data, config.seed, info.rank, info.world_size)
        self._check_data_matches_model()
        model = config.model
        generator = Generator(model.resolution, model.channels, model.latent_dim, model.g_width)
        discriminator = Discriminator(model.resolution, model.channels, model.d_width, model.d_norm)
        self.ds_configs = {net: engines.build_ds_config(config, net) for net in ("g", "d")}
        self.g_engine = engines.build_engine(generator, config, "g", self.ds_configs["g"])
        self.d_engine = engines.build_engine(discriminator, config, "d", self.ds_configs["d"])
        self.ema = EMA(self.g_engine.module, config.train.ema_decay) if config.train.ema else None
        # All randomness of a step comes from this per-rank generator: resumable, and distinct per rank.
        self.rng = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + info.rank + 1)
        fixed = torch.Generator().manual_seed(config.seed)
        self.fixed_z = torch.randn(config.train.sample_count, model.latent_dim, generator=fixed).to(self.device)
        self.global_step = 0
        self.nonfinite_streak = 0
        self.run_dir = self._make_run_dir(config_name)

    # ----------------------------------------------------------------- set-up
    def _check_data_matches_model(self) -> None:
        shape = self.loader.shape
        model = self.config.model
        if shape is not None and shape != (model.resolution, model.resolution, model.channels):
            raise UserError(
                f"data {self.config.data.shards} holds {shape[0]}x{shape[1]} images with {shape[2]} channel(s) "
                f"but model.resolution={model.resolution}, model.channels={model.channels}"
            )

    def _make_run_dir(self, config_name: str) -> Path:
        """Rank 0 names and creates the run folder; every rank learns its path."""
        train = self.config.train
        name = train.run_name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        shared = [name]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(train.run_root) / shared[0]
        if self.info.is_main:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_to_yaml(self.config))
            for net, ds_config in self.ds_configs.items():
                (run_dir / f"ds_config_{net}.json").write_text(json.dumps(ds_config, indent=2))
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("pipeline").addHandler(handler)
        return run_dir

    def latents(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.config.model.latent_dim, generator=self.rng, device=self.device)
        return z.to(self.dtype)

    # ------------------------------------------------------------------ steps
    def d_step(self, real: torch.Tensor) -> dict:
        """One D micro-step on real and detached fake images: one loss, one backward."""
        kind = self.config.loss.kind
        with torch.no_grad():
            fake = self.g_engine.module(self.latents(real.shape[0]))  # raw G: no engine hooks, no graph
        d_real = self.d_engine(real).float()
        d_fake = self.d_engine(fake).float()
        loss = losses.d_loss(kind, d_real, d_fake)
        if kind == "wgan-gp":
            gp = losses.gradient_penalty(self.d_engine.module, real, fake, self.rng)
            loss = loss + self.config.loss.gp_weight * gp.float()
        self.d_engine.backward(loss)
        norm = engines.step(self.d_engine)
        return {"loss_D": loss.item(), "D(x)": losses.d_confidence(kind, d_real),
                "D(G(z))": losses.d_confidence(kind, d_fake), "grad_norm_D": norm}  # fmt: skip

    def g_step(self, batch_size: int) -> dict:
        """One G micro-step through D's raw module with D frozen: G's backward touches only G.

        Calling the D *engine* here would fire its backward hook inside g_engine.backward
        (DeepSpeed #7665), and unfrozen D params get gradients twice at ZeRO-2 (#4923)."""
        self.d_engine.module.requires_grad_(False)
        try:
            fake = self.g_engine(self.latents(batch_size))
            loss = losses.g_loss(self.config.loss.kind, self.d_engine.module(fake).float())
            self.g_engine.backward(loss)
            norm = engines.step(self.g_engine)
        finally:
            self.d_engine.module.requires_grad_(True)
        return {"loss_G": loss.item(), "grad_norm_G": norm}

    def train_step(self, batches) -> dict:
        """One global step: n_critic D updates, then one G update (each over grad-accumulation micro-batches)."""
        started, waited = time.perf_counter(), 0.0
        accumulation = self.config.deepspeed.gradient_accumulation
        d_records = []
        for _ in range(self.config.loss.n_critic * accumulation):
            before = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - before
            d_records.append(self.d_step(batch.images.to(self.device, self.dtype, non_blocking=True)))
        g_records = [self.g_step(self.config.data.batch_per_rank) for _ in range(accumulation)]
        if self.ema is not None:
            self.ema.update(self.g_engine.module)
        self.global_step += 1
        seconds = time.perf_counter() - started
        images = len(d_records) * self.config.data.batch_per_rank * self.info.world_size
        return self._reduce(d_records, g_records) | {
            "images_per_s": images / seconds, "step_time_s": seconds, "data_wait_share": waited / seconds,
        }  # fmt: skip

    def _reduce(self, d_records: list[dict], g_records: list[dict]) -> dict:
        """Means over micro-steps and ranks (one small all-reduce: every rank sees the same values)."""
        keys = ["loss_D", "D(x)", "D(G(z))", "loss_G"]
        local = [sum(r[k] for r in d_records) / len(d_records) for k in keys[:3]]
        local.append(sum(r["loss_G"] for r in g_records) / len(g_records))
        values = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        metrics = dict(zip(keys, (values / self.info.world_size).tolist()))
        metrics["grad_norm_D"] = next((r["grad_norm_D"] for r in reversed(d_records) if r["grad_norm_D"] is not None), None)
        metrics["grad_norm_G"] = next((r["grad_norm_G"] for r in reversed(g_records) if r["grad_norm_G"] is not None), None)
        for net, engine in (("D", self.d_engine), ("G", self.g_engine)):
            metrics[f"loss_scale_{net}"] = engines.loss_scale(engine)
            metrics[f"skipped_steps_{net}"] = engines.skipped_steps(engine)
            metrics[f"lr_{net}"] = engines.learning_rate(engine)
        metrics["corrupt_samples"] = self.loader.corrupt_samples
        return metrics

    def _check_finite(self, metrics: dict) -> None:
        """All ranks see the same reduced losses, so all stop together."""
        finite = math.isfinite(metrics["loss_D"]) and math.isfinite(metrics["loss_G"])
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise NonFiniteLoss(
                f"losses non-finite for {limit} consecutive steps (step {self.global_step}: "
                f"loss_D={metrics['loss_D']}, loss_G={metrics['loss_G']}); training diverged. "
                "Lower the learning rates, use fp32/bf16, or enable gradient clipping."
            )

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        train = self.config.train
        if self.info.is_main:
            log.info("run folder %s; %s", self.run_dir, self.info.summary())
        batches = self.loader.forever()
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if self.info.is_main else None
        bar = tqdm(total=train.steps, initial=self.global_step, unit="step", desc="train", mininterval=1.0,
                   disable=not (self.info.is_main and train.progress))  # fmt: skip
        metrics: dict = {}
        try:
            while self.global_step < train.steps:
                metrics = self.train_step(batches)
                self._check_finite(metrics)
                if self.info.is_main:
                    bar.update(1)
                    bar.set_postfix_str(_progress(metrics), refresh=False)
                    if self.global_step % train.log_every == 0 or self.global_step == train.steps:
                        metrics_file.write(json.dumps({"step": self.global_step, **metrics}) + "\n")
                        metrics_file.flush()
                        log.info("step %d/%d %s", self.global_step, train.steps, _progress(metrics))
                    if self.global_step % train.sample_every == 0 or self.global_step == train.steps:
                        self.save_samples()
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        if self.info.is_main:
            self.export_generator(self.run_dir / GENERATOR_EXPORT)
        return metrics

    # ---------------------------------------------------------------- outputs
    def sampling_generator(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.g_engine.module

    @torch.no_grad()
    def save_samples(self) -> Path:
        """Rank 0: a grid from the fixed latent batch, so grids are comparable across steps."""
        generator = self.sampling_generator()
        was_training = generator.training
        generator.eval()
        images = generator(self.fixed_z.to(next(generator.parameters()).dtype))
        generator.train(was_training)
        return save_grid(images, self.run_dir / "samples" / f"step_{self.global_step:07d}.png")

    def export_generator(self, path: Path) -> Path:
        return save_generator(path, self.sampling_generator(), self.config.model, self.global_step, self.ema is not None)


def _progress(metrics: dict) -> str:
    return (
        f"img/s={metrics['images_per_s']:.0f} loss_D={metrics['loss_D']:.3f} loss_G={metrics['loss_G']:.3f} "
        f"D(x)={metrics['D(x)']:.3f} D(G(z))={metrics['D(G(z))']:.3f}"
    )


def run_training(config: Config, config_name: str) -> int:
    """Entry of `pipeline train` on every rank."""
    from pipeline.dist import detect

    info = detect(config.train.device)
    engines.init_distributed(info, config.deepspeed.timeout_minutes)
    trainer = Trainer(config, info, config_name)
    metrics = trainer.train()
    if info.is_main:
        print(json.dumps({"run_dir": str(trainer.run_dir), "step": trainer.global_step,
                          **{k: metrics.get(k) for k in ("loss_D", "loss_G", "D(x)", "D(G(z))")}}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return 0


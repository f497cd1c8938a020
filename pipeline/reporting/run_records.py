"""The run folder's records, and what the tracker gets of them. Which ranks: rank 0 alone.

RUN/config.yaml, ds_config_{g,d}.json   the set-up (write_setup)
RUN/metrics.jsonl                       a logging step's means, sectioned names
RUN/samples/step_N.png                  the grid of the fixed latent batch, every sample_every
RUN/generator.pt                        the sampling generator at the end
RUN/train.log                           the `pipeline` loggers (pipeline/run.py, run_log)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import config_to_yaml
from pipeline.export import generate
from pipeline.files import keep_records_through
from pipeline.images import save_grid
from pipeline.metric_names import sectioned
from pipeline.reporting import Reporter, due

log = logging.getLogger("pipeline.train")
GENERATOR_EXPORT = "generator.pt"
METRICS_LOG = "metrics.jsonl"


class RunRecords(Reporter):
    def __init__(self, run_dir: Path, config, tracker):
        self.run_dir, self.config, self.tracker = Path(run_dir), config, tracker
        self.fixed_z = self.fixed_labels = self.columns = None  # from the trainer's settled config (its classes)
        self.bar: tqdm | None = None
        self.metrics_file = None

    def write_setup(self, trainer) -> None:
        """The config as run (the trainer's: with the classes it settled), and each engine's DeepSpeed config."""
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_to_yaml(trainer.config))
        for network, ds_config in (("g", trainer.g_engine.ds_config), ("d", trainer.d_engine.ds_config)):
            (self.run_dir / f"ds_config_{network}.json").write_text(json.dumps(ds_config, indent=2))

    def on_resume(self, step: int) -> None:
        """Metrics recorded after the resumed checkpoint belong to a future that did not happen."""
        keep_records_through(self.run_dir / METRICS_LOG, step)

    def save_samples(self, trainer) -> Path:
        if self.fixed_z is None:
            self.fixed_z, self.fixed_labels, self.columns = grid_inputs(trainer.config)
        images = generate(trainer.sampling_generator(), self.fixed_z, self.fixed_labels)
        path = self.run_dir / "samples" / f"step_{trainer.global_step:07d}.png"
        return save_grid(images, path, self.columns)

    # ------------------------------------------------------------ the loop's calls
    def on_train_start(self, trainer) -> None:
        log.info("run folder %s; %s", self.run_dir, trainer.info.summary())
        train = self.config.train
        self.bar = tqdm(
            total=train.steps,
            initial=trainer.global_step,
            unit="step",
            desc="train",
            mininterval=1.0,
            disable=not train.progress,
        )
        self.metrics_file = open(self.run_dir / METRICS_LOG, "a")  # noqa: SIM115 (closed in close())
        if trainer.global_step == 0:  # the grid before training: MLflow's image card opens on a step that has one
            self.tracker.log_image(self.save_samples(trainer), "samples", 0)

    def after_step(self, trainer, metrics: dict | None) -> None:
        """Each step: the progress bar, and the sample grid when due; with a logging step's metrics, those."""
        step, train = trainer.global_step, self.config.train
        self.bar.update(1)
        if metrics is not None:
            self.bar.set_postfix_str(progress_line(metrics), refresh=False)
            self.metrics_file.write(json.dumps({"step": step, **sectioned(metrics)}) + "\n")
            self.metrics_file.flush()
            self.tracker.log_metrics(metrics, step)
            log.info("step %d/%d %s", step, train.steps, progress_line(metrics))
        if due(step, train.sample_every, train.steps):
            self.tracker.log_image(self.save_samples(trainer), "samples", step)

    def after_checkpoint(self, trainer, path: Path, seconds: float, stopping: bool) -> None:
        log.info("checkpoint %s (%.1f s)", path, seconds)
        self.tracker.set_tags({"checkpoint.latest": str(path.resolve()), "checkpoint.step": trainer.global_step})
        self.tracker.log_metrics({"checkpoint_seconds": seconds}, trainer.global_step)

    def on_train_end(self, trainer) -> None:
        self.tracker.log_artifact(trainer.export_generator(self.run_dir / GENERATOR_EXPORT), "model")
        latest = trainer.checkpointer.latest()
        if self.config.tracking.upload_final_checkpoint and latest is not None:
            self.tracker.log_artifact(latest, f"checkpoints/{latest.name}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def progress_line(metrics: dict) -> str:
    return (
        f"img/s={metrics['images_per_s']:.0f} loss_D={metrics['loss_D']:.3f} loss_G={metrics['loss_G']:.3f} "
        f"D(x)={metrics['D_x']:.3f} D(G(z))={metrics['D_G_z']:.3f}"
    )


def grid_inputs(config) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(latents, classes, columns) of a run's sample grids: the same latents for every grid, so
    grids compare across steps and runs. Class-conditional: one row per class, each row the same
    train.sample_count / C latents (a column shows one latent drawn as every class)."""
    fixed = torch.Generator().manual_seed(config.seed)
    classes = config.model.num_classes
    if not classes:
        return torch.randn(config.train.sample_count, config.model.latent_dim, generator=fixed), None, None
    columns = max(1, config.train.sample_count // classes)
    z = torch.randn(columns, config.model.latent_dim, generator=fixed).repeat(classes, 1)
    return z, torch.arange(classes).repeat_interleave(columns), columns

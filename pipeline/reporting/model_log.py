"""The sampling generator handed to the tracker as an MLflow model (rank 0)."""

from __future__ import annotations

from pipeline.export import generator_payload
from pipeline.reporting import Reporter
from pipeline.tracking.describe import training_dataset


class ModelLog(Reporter):
    """Logs the generator of a step once: after a new best FID (fid_scores.py), and at the end
    of the run when that step's generator was not logged already (run_records.py)."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.logged_step: int | None = None
        self.last_fid: dict | None = None  # the newest evaluation's result and its step

    def scored(self, result: dict) -> None:
        """An FID evaluation of this run (with its step): the final model is tagged with it when
        it is of the last step."""
        self.last_fid = result

    def log(self, trainer, fid: dict | None) -> None:
        """Queue the sampling generator (EMA) of this step, tagged with its FID when it was scored
        at this step. The tracker's thread exports and uploads it."""
        generator = trainer.sampling_generator()
        step = trainer.global_step
        payload = generator_payload(
            generator.state_dict(), trainer.config.model.model_dump(), step, trainer.ema is not None
        )
        tags = {"step": step, "dataset_digest": training_dataset(trainer.config, trainer.loader).digest}
        if fid is not None:
            tags |= {key: f"{fid[key]:.4f}" for key in ("fid", "fid_over_floor") if key in fid}
            tags["fid_n_generated"] = fid["n_generated"]
        self.tracker.log_model(payload, tags)
        self.logged_step = step

    def on_train_end(self, trainer) -> None:
        if self.logged_step != trainer.global_step:  # a new best at this step was logged already
            last = self.last_fid
            self.log(trainer, last if last is not None and last["step"] == trainer.global_step else None)

"""The names a run's figures are recorded under, defined once.

The training loop, the progress line and `Trainer.read_metrics` use plain names (`loss_D`).
MLflow and metrics.jsonl record them in sections, the part of the name before "/", which
MLflow's UI turns into one group of charts each (as Lightning users' `train/loss`):

- train/: losses, D outputs, gradient norms, loss scales, skipped updates, learning rates,
  and the world size (a resumed run may change it);
- eval/: FID, KID, the floor and the best FID, precision, recall, density and coverage, and
  the Inception Score when eval.inception_classifier is set;
- perf/: images/s, step time, data-wait share, memory, and the seconds of checkpoints and
  FID evaluations (which the step time leaves out);
- data/: corrupt samples replaced by the loader;
- system/: MLflow's own system metrics (pipeline/tracking/system_metrics.py).

Run folders written before the sections recorded plain names in metrics.jsonl;
`sync-tracking` maps them with SECTIONED, so nothing written then is lost.
"""

from __future__ import annotations

_SECTIONS = {
    "train": (
        *("loss_D", "loss_G", "D_x", "D_G_z", "grad_norm_D", "grad_norm_G"),
        *("loss_scale_D", "loss_scale_G", "skipped_steps_D", "skipped_steps_G", "lr_D", "lr_G", "world_size"),
    ),
    "eval": (
        *("fid", "kid", "fid_floor", "fid_over_floor", "best_fid", "precision", "recall", "density", "coverage"),
        *("inception_score", "inception_score_std"),
    ),
    "perf": (
        "images_per_s",
        "step_time_s",
        "data_wait_share",
        "rss_mb",
        "gpu_peak_mb",
        "fid_seconds",
        "checkpoint_seconds",
    ),
    "data": ("corrupt_samples",),
}
SECTIONED = {name: f"{section}/{name}" for section, names in _SECTIONS.items() for name in names}
# Kept in metrics.jsonl but not charted: train.log_every, but for a run's last, partial window.
RECORD_ONLY = ("steps_in_mean",)
BEST_FID = SECTIONED["best_fid"]


def sectioned(metrics: dict) -> dict:
    """The figures under their recorded names; names already sectioned stay as they are."""
    return {SECTIONED.get(key, key): value for key, value in metrics.items()}


def run_metric(metrics: dict, name: str):
    """A plain-named figure of an MLflow run's metrics, from a run recorded before the sections too."""
    return metrics.get(SECTIONED[name], metrics.get(name))


# An FID evaluation's figures (fid.jsonl's fields) and the names they are recorded under.
FID_FIELDS = {"fid": "fid", "kid": "kid", "fid_floor": "fid_floor", "fid_over_floor": "fid_over_floor"}
FID_FIELDS |= {name: name for name in ("precision", "recall", "density", "coverage")}
FID_FIELDS |= {name: name for name in ("inception_score", "inception_score_std")}
FID_FIELDS |= {"seconds": "fid_seconds"}


def fid_metrics(result: dict) -> dict:
    """The metrics of one FID evaluation (an FidEvaluator result or a fid.jsonl record), plain-named."""
    return {name: result[field] for field, name in FID_FIELDS.items() if field in result}

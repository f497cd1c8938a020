"""What the training run tells its tracker: the `Tracker` protocol, and the tracker of the ranks
that track nothing.

Which ranks run it: rank 0 with tracking enabled gets an `MlflowTracker`; every other rank,
and rank 0 with tracking.enabled false, a `NullTracker`, which never imports mlflow or
touches the store. Every method returns at once: an MlflowTracker only queues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    """The protocol's bodies do nothing: NullTracker is the protocol itself, and a conformance
    test (tests/test_tracking_protocol.py) holds MlflowTracker to the same signatures."""

    run_id: str | None = None
    uri: str | None = None

    def start(
        self, run_name: str, run_id: str | None = None, tags: dict | None = None, system_metrics_node: str | None = None
    ):
        """Open a new run, or reopen `run_id` (a resumed training); returns its id.
        system_metrics_node: None, no system metrics; "", this node's, in MLflow's own System
        metrics section (a one-node job); a node name, under system/NAME/ (system_metrics.py)."""

    def log_params(self, params: dict) -> None:
        """Fixed at the run's start (config, DeepSpeed configs, versions)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Figures under plain names (loss_D) or sectioned ones (pipeline/metric_names.py)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or a folder."""

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image of a step (the sample grids), shown by the UI's image card."""

    def set_tags(self, tags: dict) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict) -> None:
        """A dataset input; context: training or evaluation."""

    def log_model(self, payload: dict, tags: dict) -> None:
        """The generator of an export payload (pipeline/export.py) as an MLflow model."""

    def update_parent(self) -> None:
        """A sweep's parent run takes its best child's FID (tracking.parent_run)."""

    def sync(self, run_dir: Path, up_to_step: int) -> None:
        """Deliver what the run folder recorded up to `up_to_step` and the run lacks."""

    def finish(self, status: str, error: str | None = None) -> None:
        """The run's end state (FINISHED, FAILED, KILLED); waits a bounded time for delivery."""

    def where(self) -> str | None:
        """One line saying where to see the run, or None."""


class NullTracker(Tracker):
    """Ranks other than 0, or tracking.enabled: false: every call does nothing."""


def make_tracker(tracking, run_root, is_main: bool) -> Tracker:
    """Rank 0 with tracking enabled gets the MLflow tracker (its store checked to answer);
    everyone else the null one."""
    if not (is_main and tracking.enabled):
        return NullTracker()
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking, run_root)

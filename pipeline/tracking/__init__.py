"""Run tracking: MLflow by default, behind the `Tracker` protocol.

One module per job:
- tracker.py: the protocol, NullTracker (the ranks that track nothing) and make_tracker;
- mlflow_tracker.py: the MLflow tracker (rank 0) and its delivery thread;
- delivery.py: the queued operations, each delivering itself, and the queue;
- describe.py: what a run records at its start (name, tags, params, datasets), pure;
- store.py: the store's URI, its first contact, locks, and the command that serves its UI;
- redaction.py: no credentials in what is shown or logged;
- sweeps.py: parent and child runs; sync.py: a run folder's records delivered afterwards;
- system_metrics.py: MLflow's per-node sampler; model_registry.py: the generator as a model.
"""

from pipeline.tracking.redaction import redact_uri, safe_overrides, safe_params
from pipeline.tracking.store import UI_MODEL_TRAINING
from pipeline.tracking.tracker import NullTracker, Tracker, make_tracker

__all__ = ["UI_MODEL_TRAINING", "NullTracker", "Tracker", "make_tracker", "redact_uri", "safe_overrides", "safe_params"]

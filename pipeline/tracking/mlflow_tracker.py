"""MLflow tracking that never slows or stops training, and loses nothing in an outage.

Which ranks run it: rank 0 alone (tracker.make_tracker).

The training thread only appends typed operations (delivery.py) to an in-memory queue. A
background thread delivers them in order (metrics coalesced into `log_batch` calls of up to
1000 values) every `tracking.flush_every_s`. When the server is unreachable, slow or
erroring, the thread keeps the queue and retries with back-off, warning once per outage;
after `tracking.max_buffered_metrics` queued values the oldest metrics are dropped, with a
warning. At the end of the run `finish` waits at most `tracking.flush_timeout_s`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.metric_names import RECORD_ONLY, sectioned
from pipeline.tracking import delivery
from pipeline.tracking.redaction import redact_uri, safe_params
from pipeline.tracking.store import UI_MODEL_TRAINING, connect, is_client_error, serve_command
from pipeline.tracking.sweeps import child_tags, find_or_create_parent
from pipeline.tracking.system_metrics import start_system_metrics
from pipeline.tracking.tracker import Tracker

log = logging.getLogger("pipeline.tracking")


class MlflowTracker(Tracker):
    """Rank 0 only. Construction checks that the store answers: a bad URI fails here, before training."""

    def __init__(self, tracking, run_root: str | Path, create_experiment: bool = True):
        self.config = tracking
        self.run_root = Path(run_root)
        self.store = connect(tracking, run_root, create_experiment)
        self.client, self.uri = self.store.client, self.store.uri
        self.run_id: str | None = None
        self.parent_run_id: str | None = None  # set by start() when tracking.parent_run names a sweep
        self.model_uri: str | None = None  # the newest generator delivered: its registry version, or its model
        self.queue = delivery.DeliveryQueue(tracking.max_buffered_metrics)
        self.outage_since: float | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._system_metrics = None

    # ------------------------------------------------------------ training side
    def start(
        self, run_name: str, run_id: str | None = None, tags: dict | None = None, system_metrics_node: str | None = None
    ):
        """A new run, or the given one (a resumed training) set back to RUNNING; with
        system_metrics_node, MLflow's own sampler thread logs this node's system metrics."""
        tags = safe_params(tags or {})
        if self.config.parent_run:
            self.parent_run_id = find_or_create_parent(self.store, self.run_root, self.config.parent_run)
            tags |= child_tags(self.parent_run_id, self.config.parent_run)
        if run_id:
            self.client.get_run(run_id)  # raises if it is gone
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.set_tags(tags)
        else:
            self.run_id = self.client.create_run(self.store.experiment_id, run_name=run_name, tags=tags).info.run_id
        self._thread = threading.Thread(target=self._deliver_forever, name="mlflow-tracking", daemon=True)
        self._thread.start()
        if system_metrics_node is not None:
            self._system_metrics = start_system_metrics(self.config, self.run_id, self.uri, system_metrics_node)
        log.info("tracking run %s in %s (experiment %r)", self.run_id, self.store.shown_uri, self.config.experiment)
        self.update_parent()
        return self.run_id

    def log_params(self, params: dict) -> None:
        items = list(safe_params(params).items())
        for start in range(0, len(items), delivery.PARAM_BATCH_LIMIT):
            self.queue.put(delivery.Params(dict(items[start : start + delivery.PARAM_BATCH_LIMIT])))

    def log_metrics(self, metrics: dict, step: int) -> None:
        """MLflow gets the sectioned names (pipeline/metric_names.py), without the record-only ones."""
        now = int(time.time() * 1000)
        values = [
            (k, float(v), now, step)
            for k, v in sectioned(metrics).items()
            if k not in RECORD_ONLY
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and not math.isnan(float(v))
        ]
        if values:
            self.queue.put(delivery.Metrics(values))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.queue.put(delivery.Artifact(Path(path), artifact_path))

    def log_image(self, path: Path, key: str, step: int) -> None:
        self.queue.put(delivery.Image(Path(path), key, step))

    def set_tags(self, tags: dict) -> None:
        self.queue.put(delivery.Tags(safe_params(tags)))

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict) -> None:
        """A dataset input of the run, as metadata (what the UI's Datasets column shows): its
        name, digest (the manifest's sha256, cut to MLflow's 36 characters), where it is read
        from, and a profile (sample count, resolution, channels)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        remote = urlsplit(source).scheme in ("http", "https")
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="http" if remote else "local",
            source=json.dumps({"url" if remote else "uri": redact_uri(source)}),
            profile=json.dumps(profile),
        )
        self.queue.put(delivery.DatasetInput(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])))

    def log_model(self, payload: dict, tags: dict) -> None:
        """The tracker's thread exports and uploads it and, with tracking.registered_model, makes a
        registry version (model_registry.py). tags (fid, step, dataset_digest, ...) go on both."""
        if self.config.log_model:
            tags = safe_params(tags | {"run_id": self.run_id})
            self.queue.put(delivery.Model(payload, tags, self.config.registered_model))

    def update_parent(self) -> None:
        if self.parent_run_id is not None:
            self.queue.put(delivery.ParentSummary(self.parent_run_id, self.config.parent_run))

    def sync(self, run_dir: Path, up_to_step: int) -> None:
        """On a resume, what an earlier job left undelivered (the records after `up_to_step` are
        this job's, queued behind it and delivered in their turn)."""
        self.queue.put(delivery.SyncRecords(Path(run_dir), up_to_step))

    def finish(self, status: str, error: str | None = None) -> None:
        if self.run_id is None:
            return
        if error:
            self.set_tags({"error": error[:5000]})
        if self._system_metrics is not None:
            # Before the status: it stops at a finished run. Bounded: its wait wakes on finish(), then
            # at most one store request (MLFLOW_HTTP_REQUEST_TIMEOUT) and its last batch.
            self._system_metrics.finish()
        self.queue.put(delivery.Status(status))
        self.update_parent()  # after this run's own end state: the parent may be finished with it
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.flush_timeout_s)
        if len(self.queue):
            log.warning(
                "tracking: %d item(s) not delivered to %s within %.0f s (metrics.jsonl in the run "
                "folder has every metric)",
                len(self.queue),
                self.store.shown_uri,
                self.config.flush_timeout_s,
            )

    def where(self) -> str:
        """How to see this run in the MLflow UI (the URL, after the command that serves a local store)."""
        experiment = f"#/experiments/{self.store.experiment_id}?{UI_MODEL_TRAINING}"  # opens on its runs
        page = f"#/experiments/{self.store.experiment_id}/runs/{self.run_id}?{UI_MODEL_TRAINING}"
        model = f"; generator: mlflow.pytorch.load_model('{self.model_uri}')" if self.model_uri else ""
        if urlsplit(self.uri).scheme in ("http", "https"):
            base = self.store.shown_uri.rstrip("/")
            return f"MLflow run: {base}/{page} (its experiment's runs: {base}/{experiment}){model}"
        return (
            f"MLflow UI: {serve_command(self.store.shown_uri)}, then http://127.0.0.1:5000/{experiment} "
            f"(this run: http://127.0.0.1:5000/{page}){model}"
        )

    def wait_delivered(self, timeout_s: float) -> bool:
        """Wait at most timeout_s until everything queued so far has been delivered (for benchmarks
        and tests that must not time one step with the previous one's deliveries)."""
        deadline = time.monotonic() + timeout_s
        while len(self.queue):  # an operation leaves the queue once delivered
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------ delivery thread
    def _deliver_forever(self) -> None:
        backoff = 1.0
        while True:
            self._wake.wait(timeout=self.config.flush_every_s)
            self._wake.clear()
            while len(self.queue):
                batch = self.queue.next_batch()
                try:
                    delivery.merged(batch).deliver(self)
                except Exception as exc:  # server down, slow or erroring: keep everything, retry later
                    if is_client_error(exc):
                        self.queue.remove(batch)
                        log.warning(
                            "tracking: MLflow refused %s (%s); skipped", type(batch[0]).__name__, str(exc)[:300]
                        )
                        continue
                    if self.outage_since is None:
                        self.outage_since = time.time()
                        log.warning(
                            "tracking server %s unreachable (%s); buffering and retrying",
                            self.store.shown_uri,
                            str(exc)[:200],
                        )
                    if self._stop.wait(timeout=backoff) and time.time() - self.outage_since > 3600:
                        return
                    backoff = min(backoff * 2, 30.0)
                    continue
                self.queue.remove(batch)
                if self.outage_since is not None:
                    log.warning(
                        "tracking server back after %.0f s; delivering the buffer", time.time() - self.outage_since
                    )
                    self.outage_since = None
                backoff = 1.0
            if self._stop.is_set() and not len(self.queue):
                return

    @property
    def dropped_metrics(self) -> int:
        return self.queue.dropped_metrics

"""What the tracker queues: small typed operations that each deliver themselves to the store.

Which ranks run it: rank 0, from the tracker's delivery thread (tracker.py). An operation
is removed from the queue only once delivered; a store error raised out of `deliver` leaves
it queued for the next try, so each operation must be safe to deliver again after a
failure part-way (Model keeps the stage it reached).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking import model_registry
from pipeline.tracking.store import is_connection_error, store_errors
from pipeline.tracking.sweeps import summarize_into_parent
from pipeline.tracking.sync import BATCH_LIMIT, sync_records

if TYPE_CHECKING:
    from pipeline.tracking.mlflow_tracker import MlflowTracker

log = logging.getLogger("pipeline.tracking")
PARAM_BATCH_LIMIT = 100  # MLflow's log_batch limit on params per call


class Operation:
    metric_values = 0  # how many metric values it holds: the buffer's limit counts these

    def deliver(self, run: MlflowTracker) -> None:
        raise NotImplementedError


@dataclass
class Metrics(Operation):
    values: list[tuple[str, float, int, int]]  # (key, value, timestamp ms, step)

    @property
    def metric_values(self) -> int:
        return len(self.values)

    def deliver(self, run):
        from mlflow.entities import Metric

        run.client.log_batch(run.run_id, metrics=[Metric(*v) for v in self.values], synchronous=True)


@dataclass
class Params(Operation):
    params: dict[str, str]

    def deliver(self, run):
        from mlflow.entities import Param

        run.client.log_batch(run.run_id, params=[Param(k, v) for k, v in self.params.items()], synchronous=True)


@dataclass
class Tags(Operation):
    tags: dict[str, str]

    def deliver(self, run):
        from mlflow.entities import RunTag

        run.client.log_batch(run.run_id, tags=[RunTag(k, v) for k, v in self.tags.items()], synchronous=True)


@dataclass
class Artifact(Operation):
    path: Path
    folder: str | None

    def deliver(self, run):
        if not self.path.exists():  # gone, or never written: no retry can bring it, unlike an outage
            log.warning("tracking: %s does not exist; not uploaded", self.path)
        elif self.path.is_dir():
            run.client.log_artifacts(run.run_id, str(self.path), self.folder)
        else:
            run.client.log_artifact(run.run_id, str(self.path), self.folder)


@dataclass
class Image(Operation):
    path: Path
    key: str
    step: int

    def deliver(self, run):
        from PIL import Image as PILImage

        if not self.path.is_file():  # as Artifact: a missing file is not an outage
            log.warning("tracking: %s does not exist; not uploaded", self.path)
            return
        with PILImage.open(self.path) as image:
            run.client.log_image(run.run_id, image.copy(), key=self.key, step=self.step, synchronous=True)


@dataclass
class DatasetInput(Operation):
    dataset_input: object  # mlflow.entities.DatasetInput

    def deliver(self, run):
        run.client.log_inputs(run.run_id, datasets=[self.dataset_input])


@dataclass
class SyncRecords(Operation):
    """On a resume: what an earlier job left undelivered, up to the resumed step."""

    run_dir: Path
    up_to_step: int

    def deliver(self, run):
        delivered = sync_records(run.client, run.run_id, self.run_dir, self.up_to_step)
        if any(delivered.values()):
            log.info("tracking: delivered records the run lacked: %s", delivered)


@dataclass
class ParentSummary(Operation):
    parent_run_id: str
    sweep: str

    def deliver(self, run):
        summarize_into_parent(run.client, run.store.experiment_id, self.parent_run_id, self.sweep)


@dataclass
class Status(Operation):
    status: str

    def deliver(self, run):
        run.client.set_terminated(run.run_id, status=self.status)


@dataclass
class Model(Operation):
    """Log the generator, then register it. A store failure raises and the retry starts from the
    stage that failed (`info` keeps the logged model), so a retry does not log the model twice.
    A failure of our own (building or exporting the module) is reported with its traceback and
    the model skipped: retrying cannot help, and the run must go on."""

    payload: dict | None
    tags: dict[str, str]
    registered_model: str | None
    info: object = field(default=None)  # MLflow's ModelInfo once logged

    def deliver(self, run):
        try:
            if self.info is None:
                self.info = model_registry.log_generator(
                    run.store.uri, run.store.experiment_id, run.run_id, self.payload, self.tags
                )
                self.payload = None
                run.client.set_tag(run.run_id, "model.uri", self.info.model_uri)
                run.model_uri = self.info.model_uri
                log.info("tracking: generator logged as %s (step %s)", self.info.model_uri, self.tags["step"])
            name = self.registered_model
            if name:
                version = model_registry.register(run.client, name, self.info, run.run_id, self.tags)
                run.model_uri = f"models:/{name}/{version.version}"
                run.client.set_tag(run.run_id, "model.registered", run.model_uri)
                log.info("tracking: registered models:/%s/%s", name, version.version)
        except Exception as exc:
            if isinstance(exc, store_errors()) or is_connection_error(exc):
                raise
            log.exception("tracking: logging the generator as an MLflow model failed (a bug: report it); skipped")


class DeliveryQueue:
    """Operations in order, shared by the training thread (put) and the delivery thread (the
    rest). Past `limit` queued metric values, the oldest metrics are dropped, with a warning."""

    def __init__(self, limit: int):
        self.limit = limit
        self.dropped_metrics = 0
        self._items: collections.deque[Operation] = collections.deque()
        self._metric_values = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, operation: Operation) -> None:
        with self._lock:
            self._items.append(operation)
            self._metric_values += operation.metric_values
            while self._metric_values > self.limit and self._drop_oldest_metrics():
                pass

    def _drop_oldest_metrics(self) -> bool:
        oldest = next((op for op in self._items if isinstance(op, Metrics)), None)
        if oldest is None:
            return False
        self._items.remove(oldest)
        self._metric_values -= oldest.metric_values
        if self.dropped_metrics == 0:
            log.warning("tracking buffer full (%d metric values): dropping the oldest", self.limit)
        self.dropped_metrics += oldest.metric_values
        return True

    def next_batch(self) -> list[Operation]:
        """The oldest operation, or the run of consecutive Metrics at the front that fits one
        log_batch call (BATCH_LIMIT values)."""
        with self._lock:
            first = self._items[0]
            if not isinstance(first, Metrics):
                return [first]
            batch, values = [], 0
            for op in self._items:
                if not isinstance(op, Metrics) or (batch and values + op.metric_values > BATCH_LIMIT):
                    break
                batch.append(op)
                values += op.metric_values
            return batch

    def remove(self, batch: list[Operation]) -> None:
        """Drop a delivered (or refused) batch from the front; a batch the buffer limit already
        dropped meanwhile is not there to remove."""
        with self._lock:
            for op in batch:
                if self._items and self._items[0] is op:
                    self._items.popleft()
                    self._metric_values -= op.metric_values


def merged(batch: list[Operation]) -> Operation:
    """A batch as one operation: consecutive Metrics become one log_batch call."""
    if len(batch) == 1:
        return batch[0]
    return Metrics([value for op in batch for value in op.values])

"""MLflow tracking that never slows or stops training, and loses nothing in an outage.

Which ranks run it: rank 0 alone creates an `MlflowTracker`; every other rank gets a
`NullTracker` and never imports mlflow or touches the store.

The training thread only appends to an in-memory queue. A background thread delivers it
in order (metrics coalesced into `log_batch` calls of up to 1000 values) every
`tracking.flush_every_s`. When the server is unreachable, slow or erroring, the thread keeps
the queue and retries with back-off, warning once per outage; after
`tracking.max_buffered_metrics` queued values the oldest metrics are dropped, with a
warning. At the end of the run `finish` waits at most `tracking.flush_timeout_s`.

Where runs go: `MLFLOW_TRACKING_URI` if set (as MLflow users expect), else `tracking.uri`,
else an embedded sqlite store `sqlite:///<run_root>/mlflow.db` with artifacts in
`<run_root>/mlartifacts` (no server needed; browse with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import UserError
from pipeline.files import read_json_lines
from pipeline.metric_names import BEST_FID, RECORD_ONLY, SECTIONED, run_metric, sectioned

log = logging.getLogger("pipeline.tracking")
SECRET_WORDS = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
BATCH_LIMIT = 1000  # MLflow's log_batch limit on metrics per call
PARAM_BATCH_LIMIT = 100


def redact_uri(uri: str) -> str:
    """Drop user:password@ and query strings (tokens live there) from a URI before it is shown or logged."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return uri  # nothing to drop; urlunsplit would also turn sqlite:////abs into sqlite://abs
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
SECRET_QUERY = re.compile(
    r"([?&][^=&\s]*(?:token|key|secret|password|sig|signature|credential)[^=&\s]*=)[^&\s]+", re.IGNORECASE
)


def redact_text(text: str) -> str:
    """Credentials inside any URL of a free text: user:password@ and secret-looking query values."""
    return SECRET_QUERY.sub(r"\1***", USERINFO.sub("", text))


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params with secret-looking keys masked and URIs stripped of credentials."""
    result = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if SECRET_WORDS.search(key):
            text = "***"
        elif "://" in text:
            text = redact_text(text)
        result[key[:250]] = text[:6000]
    return result


def safe_overrides(overrides: list[str]) -> str:
    """Command-line KEY=VALUE words as one line. A value is masked whole when the word names a
    secret anywhere: in its key, or inside a mapping value (tracking.tags={api_token: ...})."""
    words = []
    for word in overrides:
        key, sep, _ = word.partition("=")
        words.append(f"{key}{sep}***" if sep and SECRET_WORDS.search(word) else word)
    return redact_text(" ".join(words))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def resolve_uri(configured: str | None, run_root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide).

    A local sqlite store keeps its artifacts beside the database (mlartifacts/), wherever the
    URI comes from: MLflow's own default for an sqlite store is ./mlruns in whatever folder
    the job runs from, which scatters a run's artifacts over checkouts and working folders.
    An experiment made before keeps its location, so older runs still open."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        root = Path(run_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
        return uri, (database.parent / "mlartifacts").as_uri()
    return uri, None


class NullTracker:
    """Ranks other than 0, or tracking.enabled: false."""

    run_id = None
    uri = None

    def start(self, *args, **kwargs) -> None:
        return None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def log_image(self, path, key: str, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict) -> None: ...
    def log_model(self, payload: dict, tags: dict) -> None: ...
    def update_parent(self) -> None: ...
    def sync(self, run_dir: Path, up_to_step: int) -> None: ...
    def finish(self, status: str, error: str | None = None) -> None: ...

    def where(self) -> None:
        return None


def serve_command(store_uri: str, port: int = 5000) -> str:
    """The command that serves a local store's UI: the project's lean server (one worker, no job
    processes: it answers in about 12 s on 2 cores), or where the package runs without its
    checkout, `mlflow ui` with the same settings. Plain `mlflow ui` starts 4 web workers and
    8 job processes and took about 40 s to answer on 2 cores."""
    script = Path(__file__).resolve().parents[1] / "launch" / "mlflow_server.sh"
    artifacts = resolve_uri(store_uri, ".")[1]
    if script.is_file() and artifacts is not None:
        return (
            f"bash {script} --backend-store-uri {store_uri} "
            f"--artifacts-destination {urlsplit(artifacts).path} --port {port}"
        )
    return (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1 --backend-store-uri {store_uri} --port {port}"
    )


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str):
    """Serialise the creation of an sqlite store and its experiment across processes: the runs
    of a job array start together on one shared run_root, and MLflow's schema migration and
    create_experiment race otherwise ("table already exists", "experiment exists")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with file_lock(Path(uri[len("sqlite:///") :]).with_suffix(".setup-lock"), f"tracking store {uri}"):
        yield


@contextlib.contextmanager
def file_lock(lock_path: Path, what: str, timeout_s: float = 120.0):
    """An exclusive flock on lock_path across processes (and nodes, on a shared file system that
    supports it), waited for at most timeout_s."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{what}: another process held {lock_path} for {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable, misconfigured or damaged store raises when first asked (mlflow
    3.17): MlflowException (HTTP errors after retries; the file store's maintenance mode),
    OSError (a path that cannot be created), ImportError (a database URI whose driver is not
    installed), SQLAlchemyError (an sqlite file that is not a database)."""
    from mlflow.exceptions import MlflowException

    errors: tuple[type[BaseException], ...] = (MlflowException, OSError, ImportError)
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # mlflow-skinny: no database stores
        return errors
    return (*errors, SQLAlchemyError)


# MLflow 3's UI opens an experiment on its GenAI overview (traces, latency) unless told it is a
# model-training one: by this experiment tag (its values include "genai_development" and
# "custom_model_development"), and in 3.17 by the UI's GenAI / Model training switch, which a
# link sets with this query parameter (the JS's workflowType: "genai" | "machine_learning").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
UI_MODEL_TRAINING = "workflowType=machine_learning"


class MlflowTracker:
    """Rank 0 only. Construction checks that the store answers: a bad URI fails here, before training."""

    def __init__(self, config, run_root: str | Path, create_experiment: bool = True):
        # Our own retry loop below replaces MLflow's (7 retries with back-off would block a flush for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.config = config
        self.run_root = Path(run_root)
        self.uri, artifact_location = resolve_uri(config.uri, run_root)
        self.shown_uri = redact_uri(self.uri)
        scheme = urlsplit(self.uri).scheme
        if scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "file", "databricks", ""):
            raise UserError(f"tracking.uri {self.shown_uri}: unsupported scheme {scheme!r}")
        try:
            with _sqlite_setup_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment = self.client.get_experiment_by_name(config.experiment)
                if experiment is None and not create_experiment:
                    raise UserError(f"no experiment {config.experiment!r} in {self.shown_uri}")
                self.experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else self.client.create_experiment(config.experiment, artifact_location=artifact_location)
                )
                if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
                    # MLflow 3's UI opens an untagged experiment on its GenAI overview (traces,
                    # latency); a model-training experiment opens on its runs and their charts.
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        except _store_errors() as exc:
            raise UserError(
                f"tracking store {self.shown_uri} did not answer or is not usable "
                f"({type(exc).__name__}: {redact_text(str(exc).splitlines()[0][:300] if str(exc) else '')}). "
                "Start the server (launch/mlflow_server.sh), fix tracking.uri / MLFLOW_TRACKING_URI, "
                "or set tracking.enabled: false"
            ) from None
        self.run_id: str | None = None
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._buffered_metrics = 0
        self.dropped_metrics = 0
        self.outage_since: float | None = None
        self._system_metrics = None
        self.model_uri: str | None = None  # the newest generator delivered: its registry version, or its model

    # ------------------------------------------------------------ producer side
    def start(
        self, run_name: str, run_id: str | None = None, tags: dict | None = None, system_metrics: bool = False
    ) -> str:
        """A new run, or the given one (a resumed training) set back to RUNNING; with
        system_metrics, MLflow's own sampler thread logs this node's system/NODE/... metrics."""
        tags = safe_params(tags or {})
        self.parent_run_id = None
        if self.config.parent_run:
            self.parent_run_id = self._parent_run(self.config.parent_run)
            # mlflow.parentRunId: MLflow's own nesting (the UI shows the children under the parent)
            tags |= {"mlflow.parentRunId": self.parent_run_id, SWEEP_TAG: self.config.parent_run, ROLE_TAG: "child"}
        if run_id:
            self.client.get_run(run_id)  # raises if it is gone
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.set_tags(tags)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self._thread = threading.Thread(target=self._deliver_forever, name="mlflow-tracking", daemon=True)
        self._thread.start()
        if system_metrics:
            self._system_metrics = start_system_metrics(self.config, self.run_id, self.uri)
        log.info("tracking run %s in %s (experiment %r)", self.run_id, self.shown_uri, self.config.experiment)
        self.update_parent()
        return self.run_id

    def _parent_run(self, name: str) -> str:
        """The id of the parent run NAME in this experiment, made by the first child to get here.
        The children of a job array start together, on several nodes: a lock file in the shared
        run_root makes the look-up-or-create one step."""
        with file_lock(self.run_root / f"{name}.parent-lock", f"parent run {name}"):
            found = sweep_runs(self.client, self.experiment_id, name, "parent")
            if found:
                return found[0].info.run_id
            tags = {SWEEP_TAG: name, ROLE_TAG: "parent"}
            return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def update_parent(self) -> None:
        """Queue: the parent run takes its best child's FID, and is RUNNING while a child runs."""
        if self.parent_run_id is not None:
            self._put(("parent",))

    def where(self) -> str:
        """One line: how to see this run in the MLflow UI (the URL, after the command that serves
        a local store)."""
        experiment = f"#/experiments/{self.experiment_id}?{UI_MODEL_TRAINING}"  # opens on its runs
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{UI_MODEL_TRAINING}"
        model = f"; generator: mlflow.pytorch.load_model('{self.model_uri}')" if self.model_uri else ""
        if urlsplit(self.uri).scheme in ("http", "https"):
            base = self.shown_uri.rstrip("/")
            return f"MLflow run: {base}/{page} (its experiment's runs: {base}/{experiment}){model}"
        return (
            f"MLflow UI: {serve_command(self.shown_uri)}, then http://127.0.0.1:5000/{experiment} "
            f"(this run: http://127.0.0.1:5000/{page}){model}"
        )

    def _put(self, op: tuple) -> None:
        with self._lock:
            self._queue.append(op)
            if op[0] == "metrics":
                self._buffered_metrics += len(op[1])
                self._drop_oldest_metrics()

    def _drop_oldest_metrics(self) -> None:
        limit = self.config.max_buffered_metrics
        while self._buffered_metrics > limit:
            index = next((i for i, op in enumerate(self._queue) if op[0] == "metrics"), None)
            if index is None:
                return
            dropped = self._queue[index]
            del self._queue[index]
            self._buffered_metrics -= len(dropped[1])
            if self.dropped_metrics == 0:
                log.warning("tracking buffer full (%d metric values): dropping the oldest", limit)
            self.dropped_metrics += len(dropped[1])

    def log_params(self, params: dict) -> None:
        items = list(safe_params(params).items())
        for start in range(0, len(items), PARAM_BATCH_LIMIT):
            self._put(("params", dict(items[start : start + PARAM_BATCH_LIMIT])))

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Figures under plain names (loss_D) or sectioned ones; MLflow gets the sectioned
        names (pipeline/metric_names.py), without the record-only ones."""
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
            self._put(("metrics", values))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._put(("artifact", str(path), artifact_path))

    def log_image(self, path, key: str, step: int) -> None:
        self._put(("image", str(path), key, step))

    def set_tags(self, tags: dict) -> None:
        self._put(("tags", safe_params(tags)))

    def sync(self, run_dir: Path, up_to_step: int) -> None:
        """Queue the delivery of the run folder's records up to `up_to_step` that the MLflow run
        lacks (sync_records): on a resume, what an earlier job left undelivered. (The records
        after it are this job's, queued behind this and delivered in their turn.)"""
        self._put(("sync", Path(run_dir), up_to_step))

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict) -> None:
        """A dataset input of the run, as metadata (what the UI's Datasets column shows): its
        name, digest (the manifest's sha256, cut to MLflow's 36 characters), where it is read
        from, and a profile (sample count, resolution, channels). context: training or evaluation."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        remote = urlsplit(source).scheme in ("http", "https")
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="http" if remote else "local",
            source=json.dumps({"url" if remote else "uri": redact_uri(source)}),
            profile=json.dumps(profile),
        )
        self._put(("dataset", DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])))

    def log_model(self, payload: dict, tags: dict) -> None:
        """Queue the generator of an export payload (pipeline/export.py) as an MLflow model of the
        run and, with tracking.registered_model, a registry version (pipeline/model_registry.py).
        tags (fid, step, dataset_digest, ...) go on both."""
        if self.config.log_model:
            job = {"payload": payload, "tags": safe_params(tags | {"run_id": self.run_id}), "info": None}
            self._put(("model", job))

    def wait_delivered(self, timeout_s: float) -> bool:
        """Wait at most timeout_s until everything queued so far has been delivered (for benchmarks
        and tests that must not time one step with the previous one's deliveries)."""
        deadline = time.monotonic() + timeout_s
        while self._queue:  # an item leaves the queue once delivered
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def finish(self, status: str, error: str | None = None) -> None:
        """Queue the end state, then wait at most flush_timeout_s for delivery."""
        if self.run_id is None:
            return
        if error:
            self.set_tags({"error": error[:5000]})
        if self._system_metrics is not None:
            # Before the status: it stops at a finished run. Bounded: its wait wakes on finish(), then
            # at most one store request (MLFLOW_HTTP_REQUEST_TIMEOUT) and its last batch.
            self._system_metrics.finish()
        self._put(("status", status))
        self.update_parent()  # after this run's own end state: the parent may be finished with it
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.flush_timeout_s)
        left = len(self._queue)
        if left:
            log.warning(
                "tracking: %d item(s) not delivered to %s within %.0f s (metrics.jsonl in the run "
                "folder has every metric)",
                left,
                self.shown_uri,
                self.config.flush_timeout_s,
            )

    # ------------------------------------------------------------ delivery side
    def _deliver_forever(self) -> None:
        backoff = 1.0
        while True:
            self._wake.wait(timeout=self.config.flush_every_s)
            self._wake.clear()
            while self._queue:
                try:
                    self._deliver_one()
                except Exception as exc:  # server down, slow or erroring: keep everything, retry later
                    if _is_client_error(exc):
                        with self._lock:
                            op = self._queue.popleft()
                            if op[0] == "metrics":
                                self._buffered_metrics -= len(op[1])
                        log.warning("tracking: MLflow refused %s (%s); skipped", op[0], str(exc)[:300])
                        continue
                    if self.outage_since is None:
                        self.outage_since = time.time()
                        log.warning(
                            "tracking server %s unreachable (%s); buffering and retrying",
                            self.shown_uri,
                            str(exc)[:200],
                        )
                    if self._stop.wait(timeout=backoff) and time.time() - self.outage_since > 3600:
                        return
                    backoff = min(backoff * 2, 30.0)
                    continue
                if self.outage_since is not None:
                    log.warning(
                        "tracking server back after %.0f s; delivering the buffer", time.time() - self.outage_since
                    )
                    self.outage_since = None
                backoff = 1.0
            if self._stop.is_set() and not self._queue:
                return

    def _deliver_one(self) -> None:
        """Send the oldest queued item (metrics: coalesced up to BATCH_LIMIT); remove it only on success."""
        from mlflow.entities import Metric, Param, RunTag

        op = self._queue[0]
        kind = op[0]
        if kind == "metrics":
            taken, values = 0, []
            for queued in list(self._queue):
                if queued[0] != "metrics" or len(values) + len(queued[1]) > BATCH_LIMIT:
                    break
                values.extend(queued[1])
                taken += 1
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in values], synchronous=True)
            with self._lock:
                for _ in range(taken):
                    self._queue.popleft()
                self._buffered_metrics -= len(values)
            return
        if kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in op[1].items()], synchronous=True)
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()], synchronous=True)
        elif kind == "artifact":
            if Path(op[1]).is_dir():
                self.client.log_artifacts(self.run_id, op[1], op[2])
            else:
                self.client.log_artifact(self.run_id, op[1], op[2])
        elif kind == "image":
            from PIL import Image

            with Image.open(op[1]) as image:
                self.client.log_image(self.run_id, image.copy(), key=op[2], step=op[3], synchronous=True)
        elif kind == "sync":
            delivered = sync_records(self.client, self.run_id, op[1], op[2])
            if any(delivered.values()):
                log.info("tracking: delivered records the run lacked: %s", delivered)
        elif kind == "dataset":
            self.client.log_inputs(self.run_id, datasets=[op[1]])
        elif kind == "model":
            self._deliver_model(op[1])
        elif kind == "parent":
            update_parent(self.client, self.experiment_id, self.parent_run_id, self.config.parent_run)
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=op[1])
        with self._lock:
            self._queue.popleft()

    def _deliver_model(self, job: dict) -> None:
        """Log, then register: a store failure raises and the delivery loop retries from the stage
        that failed (`job` keeps the logged model), so a retry does not log the model twice. A
        failure of our own (building or exporting the module) is reported with its traceback and
        the model skipped: retrying cannot help, and the run must go on."""
        from pipeline import model_registry

        try:
            if job["info"] is None:
                job["info"] = model_registry.log_generator(
                    self.uri, self.experiment_id, self.run_id, job["payload"], job["tags"]
                )
                job["payload"] = None
                self.client.set_tag(self.run_id, "model.uri", job["info"].model_uri)
                self.model_uri = job["info"].model_uri
                log.info("tracking: generator logged as %s (step %s)", job["info"].model_uri, job["tags"]["step"])
            name = self.config.registered_model
            if name:
                version = model_registry.register(self.client, name, job["info"], self.run_id, job["tags"])
                self.model_uri = f"models:/{name}/{version.version}"
                self.client.set_tag(self.run_id, "model.registered", self.model_uri)
                log.info("tracking: registered models:/%s/%s", name, version.version)
        except Exception as exc:
            if isinstance(exc, _store_errors()) or _is_connection_error(exc):
                raise
            log.exception("tracking: logging the generator as an MLflow model failed (a bug: report it); skipped")


def _is_connection_error(exc: Exception) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.RequestException)


def _is_client_error(exc: Exception) -> bool:
    """MLflow said no to the request itself (bad value, too long): retrying cannot help."""
    code = getattr(exc, "error_code", None)
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE")


# How fid.jsonl's fields are named as metrics (Trainer.evaluate_fid logs them so).
FID_METRICS = {
    "fid": "fid",
    "kid": "kid",
    "fid_floor": "fid_floor",
    "fid_over_floor": "fid_over_floor",
    "seconds": "fid_seconds",
}
SAMPLE_ARTIFACT = re.compile(r"samples\+step\+(\d+)\+")  # how MLflow's log_image names a grid's file


SWEEP_TAG, ROLE_TAG = "sweep", "sweep_role"  # parent: (NAME, parent); each child: (NAME, child)


def sweep_runs(client, experiment_id: str, name: str, role: str) -> list:
    """The parent (role "parent") or the children ("child") of sweep NAME, oldest first."""
    query = f"tags.{SWEEP_TAG} = '{name}' and tags.{ROLE_TAG} = '{role}'"
    return client.search_runs([experiment_id], query, max_results=10_000, order_by=["attributes.start_time ASC"])


def update_parent(client, experiment_id: str, parent_run_id: str, name: str) -> None:
    """Recompute the parent's summary from all its children, so the last child to write leaves it
    right whatever the order: best_fid (the lowest of the children's best_fid) with the child's
    run id, name and overrides as tags; RUNNING while a child runs, else FINISHED."""
    from mlflow.entities import Metric, RunTag

    children = sweep_runs(client, experiment_id, name, "child")
    scored = [
        (fid, c.info.start_time, c) for c in children if (fid := run_metric(c.data.metrics, "best_fid")) is not None
    ]
    if scored:
        fid, _, best = min(scored, key=lambda item: item[:2])
        tags = {
            "best_child_run_id": best.info.run_id,
            "best_child": best.info.run_name,
            "best_child_overrides": best.data.tags.get("overrides", ""),
        }
        metric = Metric(BEST_FID, fid, int(time.time() * 1000), 0)
        client.log_batch(parent_run_id, metrics=[metric], tags=[RunTag(k, v) for k, v in tags.items()])
    running = any(c.info.status in ("RUNNING", "SCHEDULED") for c in children)
    status = client.get_run(parent_run_id).info.status
    if running and status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")
    elif not running and status == "RUNNING":
        client.set_terminated(parent_run_id, status="FINISHED")


def compare_sweep(client, experiment_id: str, name: str) -> dict:
    """The children of parent run NAME, lowest best_fid first (unscored last): run name, status,
    step, best_fid, latest fid, and the config params whose values differ between them."""
    parents = sweep_runs(client, experiment_id, name, "parent")
    if not parents:
        raise UserError(f"no parent run named {name!r} in this experiment (tracking.parent_run; slurm/sweep.sbatch)")
    children = sweep_runs(client, experiment_id, name, "child")
    same_for_all = ("config.train.run_name", "config.tracking.run_name", "config.tracking.parent_run")
    keys = sorted({k for c in children for k in c.data.params if k.startswith("config.") and k not in same_for_all})
    differing = [k for k in keys if len({c.data.params.get(k) for c in children}) > 1]
    rows = [
        {
            "run": c.info.run_name,
            "run_id": c.info.run_id,
            "status": c.info.status,
            "step": int(c.data.tags["checkpoint.step"]) if "checkpoint.step" in c.data.tags else None,
            "best_fid": run_metric(c.data.metrics, "best_fid"),
            "fid": run_metric(c.data.metrics, "fid"),
            "overrides": c.data.tags.get("overrides", ""),
            **{k.removeprefix("config."): c.data.params.get(k) for k in differing},
        }
        for c in children
    ]
    rows.sort(key=lambda r: (r["best_fid"] is None, r["best_fid"] or 0.0))
    return {
        "parent": name,
        "parent_run_id": parents[0].info.run_id,
        "differing_params": [k.removeprefix("config.") for k in differing],
        "children": rows,
    }


def start_system_metrics(config, run_id: str, uri: str):
    """MLflow's system-metrics sampler of this node, started: a daemon thread that logs on its own
    into run_id (a failure stops it, never the training). Its names carry the node
    (system/NODE/...), as every node of a job may sample into one run. Rank 0 runs one; local
    rank 0 of each other node another (train.start_node_sampler)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    sampler = SystemMetricsMonitor(
        run_id,
        sampling_interval=config.system_metrics_every_s,
        node_id=node_name(),
        tracking_uri=uri,
        resume_logging=True,  # after a resume, on from the run's last system step (0 for a new run)
    )
    sampler.start()
    return sampler


def node_name() -> str:
    """This node as Slurm names it, else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def sync_records(client, run_id: str, run_dir: Path, up_to_step: int | None = None) -> dict:
    """Deliver what the run folder recorded and its MLflow run lacks, each once: the metric values
    of metrics.jsonl and fid.jsonl (by key and step) and the sample grids (samples/step_N.png),
    of steps up to `up_to_step` (all by default). What the run has is read back first, so running
    it again delivers nothing new."""
    from mlflow.entities import Metric
    from PIL import Image

    wanted: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for name, rename in (("metrics.jsonl", None), ("fid.jsonl", FID_METRICS)):
        path = Path(run_dir) / name
        for record in read_json_lines(path) if path.exists() else []:
            step = int(record["step"])
            if up_to_step is not None and step > up_to_step:
                continue
            for key, value in record.items():
                key = rename.get(key) if rename is not None else key
                key = SECTIONED.get(key, key)  # a run folder from before the sections
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key and key not in ("step", *RECORD_ONLY) and number and not math.isnan(float(value)):
                    wanted[key][step] = float(value)
    now = int(time.time() * 1000)
    missing = []
    for key, values in wanted.items():
        present = {m.step for m in client.get_metric_history(run_id, key)}
        missing += [Metric(key, value, now, step) for step, value in sorted(values.items()) if step not in present]
    for start in range(0, len(missing), BATCH_LIMIT):
        client.log_batch(run_id, metrics=missing[start : start + BATCH_LIMIT], synchronous=True)
    logged = {int(m.group(1)) for a in client.list_artifacts(run_id, "images") if (m := SAMPLE_ARTIFACT.search(a.path))}
    grids = 0
    for grid in sorted((Path(run_dir) / "samples").glob("step_*.png")):
        step = int(grid.stem.removeprefix("step_"))
        if step not in logged and (up_to_step is None or step <= up_to_step):
            with Image.open(grid) as image:
                client.log_image(run_id, image.copy(), key="samples", step=step, synchronous=True)
            grids += 1
    return {"metric_values": len(missing), "sample_grids": grids}


def find_run(client, experiment_id: str, run_dir: Path):
    """The MLflow run of a run folder (every run is tagged with its folder's absolute path)."""
    found = client.search_runs([experiment_id], f"tags.run_dir = '{Path(run_dir).resolve()}'", max_results=2)
    if not found:
        raise UserError(
            f"no MLflow run of {run_dir} in this store (looked for tag run_dir = {Path(run_dir).resolve()})"
        )
    return found[0]


def make_tracker(config, run_root, is_main: bool):
    """Rank 0 with tracking enabled gets the real tracker; everyone else the null one."""
    if not (is_main and config.enabled):
        return NullTracker()
    return MlflowTracker(config, run_root)

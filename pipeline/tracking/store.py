"""Where runs go, and the first contact with the store.

`MLFLOW_TRACKING_URI` if set (as MLflow users expect), else `tracking.uri`, else an embedded
sqlite store `sqlite:///<run_root>/mlflow.db` with its artifacts beside it in
`<run_root>/mlartifacts`: no server needed (`serve_command` prints how to browse it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.tracking.redaction import redact_text, redact_uri

# MLflow 3's UI opens an experiment on its GenAI overview (traces, latency) unless told it is a
# model-training one: by this experiment tag (its values include "genai_development" and
# "custom_model_development"), and in 3.17 by the UI's GenAI / Model training switch, which a
# link sets with this query parameter (the JS's workflowType: "genai" | "machine_learning").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
UI_MODEL_TRAINING = "workflowType=machine_learning"
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "file", "databricks", "")


def resolve_uri(configured: str | None, run_root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide).

    A local sqlite store keeps its artifacts beside the database (mlartifacts/), wherever the
    URI comes from: MLflow's own default for an sqlite store is ./mlruns in whatever folder
    the job runs from, which scatters a run's artifacts over checkouts and working folders.
    An experiment made before keeps its location, so older runs still open."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        uri = f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"
    database = sqlite_path(uri)
    if database is not None:
        return uri, (database.parent / "mlartifacts").as_uri()
    return uri, None


def sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def serve_command(store_uri: str, port: int = 5000) -> str:
    """The command that serves a local store's UI: the project's lean server (one worker, no job
    processes: it answers in about 12 s on 2 cores), or where the package runs without its
    checkout, `mlflow ui` with the same settings. Plain `mlflow ui` starts 4 web workers and
    8 job processes and took about 40 s to answer on 2 cores."""
    script = Path(__file__).resolve().parents[2] / "launch" / "mlflow_server.sh"
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


def store_errors() -> tuple[type[BaseException], ...]:
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


def is_connection_error(exc: Exception) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.RequestException)


def is_client_error(exc: Exception) -> bool:
    """MLflow said no to the request itself (bad value, too long): retrying cannot help."""
    code = getattr(exc, "error_code", None)
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE")


@dataclass
class Store:
    """An answering store and the experiment in it."""

    client: object  # mlflow.MlflowClient
    uri: str
    experiment_id: str

    @property
    def shown_uri(self) -> str:
        return redact_uri(self.uri)


def connect(tracking, run_root: str | Path, create_experiment: bool = True) -> Store:
    """The store of `tracking` (a TrackingConfig) and its experiment, checked to answer: a bad
    URI fails here, in one line, before any training. With create_experiment false (reading
    commands), neither a missing sqlite file nor a missing experiment is created."""
    # Our own retry loop (delivery.py) replaces MLflow's: its 7 retries with back-off would block
    # a flush for minutes. Set where rank 0 first talks to the store, not at import.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    uri, artifact_location = resolve_uri(tracking.uri, run_root)
    shown = redact_uri(uri)
    scheme = urlsplit(uri).scheme
    if scheme not in SCHEMES:
        raise UserError(f"tracking.uri {shown}: unsupported scheme {scheme!r}")
    database = sqlite_path(uri)
    if database is not None and not create_experiment and not database.is_file():
        raise UserError(f"no tracking store at {database} (check --run-root or --tracking-uri)")
    try:
        with _setup_lock(database):
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(tracking.experiment)
            if experiment is None and not create_experiment:
                raise UserError(f"no experiment {tracking.experiment!r} in {shown}")
            if experiment is None:
                experiment_id = client.create_experiment(tracking.experiment, artifact_location=artifact_location)
            else:
                experiment_id = experiment.experiment_id
            if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
                # An untagged experiment opens on the GenAI overview; a model-training one on its runs.
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    except store_errors() as exc:
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise UserError(
            f"tracking store {shown} did not answer or is not usable "
            f"({type(exc).__name__}: {redact_text(first_line)}). "
            "Start the server (launch/mlflow_server.sh), fix tracking.uri / MLFLOW_TRACKING_URI, "
            "or set tracking.enabled: false"
        ) from None
    return Store(client, uri, experiment_id)


@contextlib.contextmanager
def _setup_lock(database: Path | None):
    """Serialise the creation of an sqlite store and its experiment across processes: the runs
    of a job array start together on one shared run_root, and MLflow's schema migration and
    create_experiment race otherwise ("table already exists", "experiment exists")."""
    if database is None:
        yield
        return
    with file_lock(database.with_suffix(".setup-lock"), f"tracking store {database}"):
        yield

"""MLflow tracking against the embedded sqlite store and a real `mlflow server` process."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.tracking import UI_MODEL_TRAINING, redact_uri, safe_params
from tests.conftest import REPO, child_env, run_cli, train_overrides


def train(shards, tmp_path, *extra, env=None, timeout=300):
    result = run_cli(
        "train",
        "--config",
        REPO / "configs/mnist32.yaml",
        *train_overrides(shards, tmp_path, *extra),
        env=env,
        timeout=timeout,
    )
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None)


def sqlite_client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def logged_at(line: str) -> float:
    """Seconds since the epoch of a log line's leading `2026-11-27 20:47:18,742` timestamp."""
    stamp, _, millis = " ".join(line.split()[:2]).partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def steps_of(client, run_id, key="train/loss_D"):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_embedded_sqlite_run_has_params_metrics_images_and_artifacts(mnist_shards, tmp_path):
    result, summary = train(
        mnist_shards,
        tmp_path,
        "train.steps=6",
        "train.sample_every=3",
        "train.log_every=2",
        "train.run_name=r1",
        "tracking.tags={team: gan}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = sqlite_client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    params = run.data.params
    assert params["config.model.resolution"] == "32" and params["world_size"] == "1"
    assert params["ds_d.gradient_clipping"] == "0.0" and params["version.deepspeed"] == "0.19.8"
    assert len(params["data.manifest_sha256"]) == 64 and params["data.count"] == "512"
    assert run.data.tags["team"] == "gan" and run.data.tags["checkpoint.latest"].endswith("step_0000006")
    # Who ran what: MLflow's own tags fill "Created by", "Source" and the description.
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipeline train" and tags["mlflow.user"]
    assert (
        tags["mlflow.note.content"].startswith("DCGAN 32x32x1 on ")
        and "fp32 ZeRO-0, 1 rank(s), 6 steps" in (tags["mlflow.note.content"])
    )
    # Charts in sections (train/, perf/, data/...: MLflow groups them by prefix); constants are no charts.
    for key in ("loss_D", "loss_G", "D_x", "D_G_z", "grad_norm_D"):
        assert steps_of(client, run.info.run_id, f"train/{key}") == [2, 4, 6], key
    for key in ("images_per_s", "data_wait_share", "rss_mb"):
        assert steps_of(client, run.info.run_id, f"perf/{key}") == [2, 4, 6], key
    assert all("/" in key for key in run.data.metrics) and "steps_in_mean" not in str(list(run.data.metrics))
    record = json.loads((tmp_path / "runs" / "r1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/loss_D", "perf/images_per_s", "steps_in_mean"} <= set(record)  # the same names as MLflow's
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # system metrics: off on CPU by default
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "model", "images"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/generator.pt"}
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples+step+3+" in p for p in images) and any("samples+step+6+" in p for p in images)
    # The training data as an MLflow dataset input, identified by its manifest's sha256.
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == f"{mnist_shards.name}:train"  # the manifest's folder and split, as for evaluation
    assert dataset.digest == params["data.manifest_sha256"][:36] and dataset.source_type == "local"
    assert json.loads(dataset.source)["uri"] == str(mnist_shards / "manifest.json")
    assert json.loads(dataset.profile) == {"num_samples": 512, "resolution": 32, "channels": 1, "split": "train"}
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
    # The experiment opens on its runs in MLflow 3's UI, and the run says how to get there.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    experiment = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}?{UI_MODEL_TRAINING}"
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{UI_MODEL_TRAINING}"
    store = f"sqlite:///{tmp_path}/runs/mlflow.db"
    artifacts = f"{tmp_path}/runs/mlartifacts"
    serve = f"bash {REPO}/launch/mlflow_server.sh --backend-store-uri {store} --artifacts-destination {artifacts}"
    assert f"MLflow UI: {serve} --port 5000, then {experiment} (this run: {page})" in result.stderr


@pytest.mark.slow
def test_an_sqlite_uri_keeps_artifacts_beside_its_database_not_in_the_working_folder(mnist_shards, tmp_path):
    """MLFLOW_TRACKING_URI=sqlite:///... as docs/tracking.md suggests: MLflow's own default would put
    the artifacts in ./mlruns of whatever folder the job runs from."""
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir()
    work.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    overrides = train_overrides(mnist_shards, tmp_path, "train.steps=2", "train.run_name=s")
    result = run_cli("train", *overrides, env=env, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert (store / "mlartifacts").is_dir() and not list(work.iterdir())  # nothing in the working folder


@pytest.mark.slow
def test_system_metrics_are_sampled_when_asked(mnist_shards, tmp_path):
    """Off by default on CPU; on, MLflow's sampler logs them into the run, under MLflow's own
    names on a one-node job (its System metrics section; multi-node: tests/test_slurm.py)."""
    result, summary = train(
        mnist_shards,
        tmp_path,
        "train.steps=150",  # several sampling intervals: MLflow's sampler drops a last partial one
        "train.run_name=s",
        "tracking.system_metrics=true",
        "tracking.system_metrics_every_s=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = sqlite_client(tmp_path).get_run(summary["mlflow_run_id"]).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{name}" in metrics, sorted(metrics)


@pytest.mark.slow
def test_resume_continues_the_same_run(mnist_shards, tmp_path):
    first, summary1 = train(mnist_shards, tmp_path, "train.steps=3", "train.run_name=r")
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_cli(
        "train",
        "--config",
        REPO / "configs/mnist32.yaml",  # the first run's config: the optimiser settings must match to resume
        *train_overrides(mnist_shards, tmp_path, "train.steps=6", "train.run_name=r"),
        "--resume",
        "auto",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary2 = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary2["mlflow_run_id"] == summary1["mlflow_run_id"]
    client = sqlite_client(tmp_path)
    assert steps_of(client, summary1["mlflow_run_id"]) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(summary1["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "3"
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_failed_run_is_marked_failed_with_the_error(mnist_shards, tmp_path):
    result, _ = train(
        mnist_shards,
        tmp_path,
        "train.d_optim.lr=1e30",
        "train.g_optim.lr=1e30",
        "train.steps=50",
        "train.max_nonfinite_steps=2",
        "train.run_name=bad",
    )
    assert result.returncode == 3
    client = sqlite_client(tmp_path)
    [run] = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["error"]


@pytest.mark.slow
def test_bad_uri_is_a_clear_error_before_training(mnist_shards, tmp_path):
    result, _ = train(mnist_shards, tmp_path, "tracking.uri=http://127.0.0.1:9", "train.run_name=x", timeout=120)
    assert result.returncode == 2 and "did not answer" in result.stderr and "127.0.0.1:9" in result.stderr
    assert not (tmp_path / "runs" / "x").exists()  # nothing was started
    result, _ = train(mnist_shards, tmp_path, "tracking.uri=ftp://host/x")
    assert result.returncode == 2 and "unsupported scheme 'ftp'" in result.stderr
    # tracking can be switched off: then the bad URI is never contacted
    result, _ = train(
        mnist_shards,
        tmp_path,
        "tracking.uri=http://127.0.0.1:9",
        "tracking.enabled=false",
        "train.steps=1",
        "train.run_name=off",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    # MLFLOW_TRACKING_URI wins over the config, as MLflow users expect
    result, _ = train(mnist_shards, tmp_path, "train.run_name=y", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 2 and "127.0.0.1:9" in result.stderr


@pytest.mark.slow
def test_secrets_never_reach_params_or_tags(mnist_shards, tmp_path):
    assert redact_uri("https://alice:hunter2@host:5000/path?token=abc") == "https://host:5000/path"
    assert safe_params({"db_password": "x", "api_token": "y", "uri": "postgresql://u:p@h/db"}) == {
        "db_password": "***",
        "api_token": "***",
        "uri": "postgresql://h/db",
    }
    result, summary = train(
        mnist_shards,
        tmp_path,
        "train.steps=1",
        "train.run_name=s",
        "tracking.tags={api_token: hunter2, note: 'see https://bob:hunter2@example.org/x'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = sqlite_client(tmp_path).get_run(summary["mlflow_run_id"])
    assert not any("hunter2" in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert run.data.tags["overrides"].endswith("train.run_name=s tracking.tags=***")  # the command line, masked


@pytest.mark.slow
def test_real_server_outage_mid_run_loses_no_metric(mnist_shards, tmp_path, mlflow_server):
    steps = 300
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            *train_overrides(
                mnist_shards,
                tmp_path,
                f"train.steps={steps}",
                "train.run_name=o",
                "train.checkpoint_every=100000",
                "tracking.flush_every_s=0.5",
                "tracking.flush_timeout_s=120",
            ),
        ],
        cwd=REPO,
        env=child_env({"MLFLOW_TRACKING_URI": mlflow_server.url}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_file = tmp_path / "runs" / "o" / "metrics.jsonl"
    lines = lambda: len(metrics_file.read_text().splitlines()) if metrics_file.exists() else 0  # noqa: E731
    deadline = time.time() + 120
    while lines() < 20 and time.time() < deadline:
        time.sleep(0.1)
    mlflow_server.stop()
    during = lines()
    time.sleep(5)
    assert lines() > during  # training went on while the server was down
    mlflow_server.start()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "unreachable" in stderr and "server back" in stderr
    run_id = json.loads(stdout.strip().splitlines()[-1])["mlflow_run_id"]
    client = MlflowClient(mlflow_server.url)
    assert steps_of(client, run_id) == list(range(1, steps + 1))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_end_of_run_waits_a_bounded_time_when_the_server_stays_down(mnist_shards, tmp_path, mlflow_server):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            *train_overrides(
                mnist_shards, tmp_path, "train.steps=100", "train.run_name=d", "tracking.flush_timeout_s=3"
            ),
        ],
        cwd=REPO,
        env=child_env({"MLFLOW_TRACKING_URI": mlflow_server.url}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_file = tmp_path / "runs" / "d" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    mlflow_server.stop()
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()  # a hung run must not outlive the test (one did, at exit: see pipeline/engines.py)
        raise
    assert proc.returncode == 0, stderr[-3000:]  # training itself succeeded
    # The end of the run, from its last step to giving up on delivery, takes flush_timeout_s (3 s)
    # and the end's own work, whatever the 100 steps took on a busy machine.
    last_step = next(line for line in stderr.splitlines() if "step 100/100" in line)
    gave_up = next(line for line in stderr.splitlines() if "not delivered" in line)
    assert 3 <= logged_at(gave_up) - logged_at(last_step) < 30, (last_step, gave_up)
    assert len(metrics_file.read_text().splitlines()) == 100  # the local record is complete

    # The server is back after the job: sync-tracking delivers what the run lacks, once.
    mlflow_server.start()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    client = MlflowClient(mlflow_server.url)
    run_id = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])[0].info.run_id
    assert len(steps_of(client, run_id)) < 100
    with open(metrics_file, "a") as f:
        f.write('{"step": 101, "loss_')  # a torn last line, as a kill during a write leaves one
    synced = run_cli("sync-tracking", tmp_path / "runs" / "d", env=env, timeout=120)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert "dropped a torn last line" in synced.stderr
    assert steps_of(client, run_id) == list(range(1, 101)) and steps_of(client, run_id, "train/D_x") == list(
        range(1, 101)
    )
    assert [a.path for a in client.list_artifacts(run_id, "images") if "samples+step+100+" in a.path]
    again = run_cli("sync-tracking", tmp_path / "runs" / "d", env=env, timeout=120)
    assert f"run {run_id}: delivered 0 metric value(s) and 0 sample grid(s)" in again.stdout
    assert steps_of(client, run_id) == list(range(1, 101))  # nothing twice
    missing = run_cli("sync-tracking", tmp_path / "nowhere", env=env, timeout=60)
    assert missing.returncode == 2 and "is not a run folder (no config.yaml)" in missing.stderr


def test_store_that_is_not_a_database_is_a_clear_error(tmp_path):
    """The store check catches what a damaged store raises (here sqlalchemy's DatabaseError), not
    every exception: a bug in our own code keeps its traceback."""
    from pipeline.config import load_config
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 400)
    config = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    with pytest.raises(
        UserError, match=f"tracking store sqlite:///{tmp_path}/mlflow.db did not answer .*DatabaseError"
    ):
        MlflowTracker(config, tmp_path)


def test_sync_maps_a_run_folder_from_before_the_sections(tmp_path):
    """metrics.jsonl and fid.jsonl of a run recorded before the metric sections hold plain names:
    sync-tracking delivers them under the sectioned ones, so old and new runs chart together."""
    from pipeline.tracking.sync import sync_records

    run_dir = tmp_path / "old-run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "loss_D": 1.5, "images_per_s": 90.0, "corrupt_samples": 0, "steps_in_mean": 1}\n'
        '{"step": 2, "train/loss_D": 1.4, "perf/images_per_s": 95.0, "steps_in_mean": 1}\n'
    )
    (run_dir / "fid.jsonl").write_text('{"step": 2, "checkpoint": "step_0000002", "fid": 30.0, "seconds": 4.0}\n')
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("old", (tmp_path / "artifacts").as_uri())).info.run_id
    sync_records(client, run_id, run_dir)
    metrics = client.get_run(run_id).data.metrics
    assert set(metrics) == {"train/loss_D", "perf/images_per_s", "data/corrupt_samples", "eval/fid", "perf/fid_seconds"}
    assert steps_of(client, run_id) == [1, 2]


def test_runs_are_named_by_their_config_and_what_their_overrides_change():
    from pipeline.tracking.describe import run_title

    overrides = ["train.g_optim.lr=1e-3", "seed=1", "data.shards=/data/x", "tracking.experiment=e", "train.run_root=r"]
    assert run_title("mnist32", overrides) == "mnist32 g_optim.lr=1e-3 seed=1"
    assert run_title("celeba64", []) == "celeba64"
    assert run_title("c", ["tracking.tags={api_token: x}", "data.batch_per_rank=8"]) == "c batch_per_rank=8"
    # How a run is watched (intervals, evaluation) is not what it trains: two runs differing in
    # the learning rate alone read apart even in the runs table's narrow name column.
    watched = [
        "train.steps=4",
        "train.sample_every=2",
        "train.log_every=1",
        "eval.fid_every=0",
        "train.g_optim.lr=1e-3",
    ]
    assert run_title("mnist32", watched) == "mnist32 steps=4 g_optim.lr=1e-3"

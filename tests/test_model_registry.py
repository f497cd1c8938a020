"""The generator as an MLflow model and registry versions, on the embedded sqlite store and a real
`mlflow server`; loaded back in fresh interpreters as a user would."""

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.export import generate, generator_payload, inference_generator
from pipeline.models import build_generator
from pipeline.tracking import model_registry
from tests.conftest import child_env, run_cli, train_overrides

MODEL = {"arch": "dcgan", "resolution": 32, "channels": 1, "latent_dim": 100, "g_width": 16}


def payload(seed: int = 0, step: int = 7) -> dict:
    """A generator export payload whose BatchNorm running statistics are stale, as the EMA's are."""
    torch.manual_seed(seed)
    generator = build_generator("dcgan", 32, 1, 100, 16)
    for module in generator.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
            module.running_var.fill_(3.0)
    return generator_payload(generator.state_dict(), MODEL, step, ema=True)


def test_the_inference_generator_samples_one_latent_like_a_batch_does():
    """The logged module runs in eval mode with BatchNorm statistics recomputed for its weights:
    its images match batch-statistics sampling (how the run's grids and FID sample), and one
    latent at a time gives what the batch gives. The stale statistics would not."""
    exported = payload()
    z = torch.randn(256, 100, generator=torch.Generator().manual_seed(1))
    reference = generate(build_from(exported), z)
    module = inference_generator(exported)
    assert not module.training
    with torch.no_grad():
        batched = module(z)
        one_by_one = torch.cat([module(z[i : i + 1]) for i in range(8)])
        stale = build_from(exported).eval()(z)
    torch.testing.assert_close(one_by_one, batched[:8], rtol=0, atol=1e-5)
    error = (batched - reference).abs().mean() / reference.abs().mean()
    stale_error = (stale - reference).abs().mean() / reference.abs().mean()
    assert error < 0.05 and stale_error > 0.5, (error, stale_error)


def build_from(exported: dict) -> torch.nn.Module:
    from pipeline.export import generator_from_payload

    return generator_from_payload(exported)


LOAD_IN_FRESH_PYTHON = """
import json, sys
import mlflow, numpy as np, torch
mlflow.set_tracking_uri(sys.argv[1])
module = mlflow.pytorch.load_model(sys.argv[2])
images = module(torch.randn(5, 100))
predicted = mlflow.pyfunc.load_model(sys.argv[2]).predict(np.random.randn(3, 100).astype(np.float32))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "deepspeed", "tests"))
print(json.dumps({"shape": list(images.shape), "low": float(images.min()), "high": float(images.max()),
                  "predicted": list(predicted.shape), "ours": ours}))
"""


def load_in_fresh_python(tracking_uri: str, model_uri: str, tmp_path) -> dict:
    """Load a model as a user would: a new interpreter that imports mlflow and torch only, run
    outside the repository (our package is not on its path)."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PYTHON, tracking_uri, model_uri],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=child_env({"PYTHONPATH": ""}),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path):
    """A tracking URI: the embedded sqlite store, or a real `mlflow server` (artifacts proxied)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
        return
    server = request.getfixturevalue("mlflow_server")
    yield server.url


@pytest.mark.slow
def test_best_follows_the_lowest_fid_over_runs_and_latest_is_the_newest(store, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    client = MlflowClient(store)
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    name = "dcgan-test"

    def new_version(run_id: str, step: int, fid: str | None) -> str:
        tags = {"step": str(step), "run_id": run_id, "dataset_digest": "d" * 64} | ({"fid": fid} if fid else {})
        info = model_registry.log_generator(store, experiment, run_id, payload(seed=step, step=step), tags)
        return str(model_registry.register(client, name, info, run_id, tags).version)

    def best() -> str:
        return str(client.get_model_version_by_alias(name, "best").version)

    assert new_version(runs[0], 10, None) == "1"  # no FID yet: no best
    assert not client.get_registered_model(name).aliases
    assert new_version(runs[0], 20, "50.0") == "2" and best() == "2"
    assert new_version(runs[1], 10, "30.5") == "3" and best() == "3"  # another run's lower FID takes it
    assert new_version(runs[0], 30, "40.0") == "4" and best() == "3"  # a higher one does not
    assert new_version(runs[1], 20, "30.5") == "5" and best() == "3"  # a tie keeps the older
    version = client.get_model_version(name, "3")
    assert version.run_id == runs[1] and version.tags["fid"] == "30.5" and version.tags["step"] == "10"
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == runs[1] and logged.experiment_id == experiment  # the run's, not Default
    # The logged model knows its registry version, as the UI reads it (not "Not registered").
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked] == [(name, "3")]

    # Logging left no store or experiment behind in this process's environment (its children inherit it).
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == environment
    latest = load_in_fresh_python(store, f"models:/{name}/latest", tmp_path)  # MLflow's own: version 5
    assert latest["shape"] == [5, 1, 32, 32] and latest["predicted"] == [3, 1, 32, 32]
    assert -1 <= latest["low"] < latest["high"] <= 1
    assert latest["ours"] == []  # nothing of this package was imported to load it
    assert load_in_fresh_python(store, f"models:/{name}@best", tmp_path)["shape"] == [5, 1, 32, 32]


@pytest.mark.slow
def test_a_run_logs_and_registers_its_generator_on_a_real_server(mnist_shards, tmp_path, mlflow_server):
    result = run_cli(
        "train",
        *train_overrides(
            mnist_shards,
            tmp_path,
            "train.steps=3",
            "train.run_name=m",
            "tracking.log_model=true",
            "tracking.registered_model=g",
        ),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    client = MlflowClient(mlflow_server.url)
    (version,) = client.search_model_versions("name = 'g'")
    manifest_sha256 = client.get_run(run_id).data.params["data.manifest_sha256"]
    assert version.run_id == run_id
    assert version.tags == {"step": "3", "run_id": run_id, "dataset_digest": manifest_sha256}
    assert client.get_run(run_id).data.tags["model.registered"] == "models:/g/1"
    experiment = client.get_run(run_id).info.experiment_id
    (logged,) = client.search_logged_models([experiment])  # in the run's experiment: its Models tab
    assert logged.source_run_id == run_id and version.source == f"models:/{logged.model_id}"
    assert "generator: mlflow.pytorch.load_model('models:/g/1')" in result.stderr
    loaded = load_in_fresh_python(mlflow_server.url, "models:/g/1", tmp_path)
    assert loaded["shape"] == [5, 1, 32, 32] and loaded["ours"] == []

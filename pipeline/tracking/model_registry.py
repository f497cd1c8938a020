"""The generator as an MLflow PyTorch model of its run, and as versions in the model registry.

Which ranks run it: rank 0 alone, from the tracker's delivery thread (pipeline/tracking/delivery.py),
so a slow or unreachable store never holds up training.

What a user gets (MLflow 3.17):
- `mlflow.pytorch.load_model(uri)`: a module mapping latents (N, latent_dim) to images
  (N, C, H, W) in [-1, 1], loadable with torch and mlflow alone. It is saved as a
  `torch.export` program ("pt2", MLflow's default outside Databricks), so loading runs no
  pickled code and needs none of this package.
- `mlflow.pyfunc.load_model(uri).predict(z)` with z a float32 array of that shape.
- A class-conditional generator (model.conditional) takes (N, latent_dim + 1): each row its
  latent, then the class to draw in the last column, so `models:/NAME@best` draws any class
  (`np.c_[z, np.full(N, 7)]` gives sevens). MLflow's torch.export format ("pt2") accepts
  only tensor signatures and its PyTorch flavour one unnamed array, so the class is a column
  of that array; the model's metadata says so (`input`). An `export --class K` file takes
  latents alone and draws class K.
- With tracking.registered_model, a registry version per logged model, tagged with its FID,
  step, run id and dataset digest. The alias `best` follows the version of lowest FID.
  The newest version needs no alias: MLflow reserves `latest` for it (`models:/NAME/latest`,
  mlflow/utils/validation.py `_validate_model_alias_name_reserved`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import numpy as np
import torch

from pipeline.export import inference_generator

log = logging.getLogger("pipeline.tracking")
MODEL_NAME = "generator"  # the logged model's name in its run
BEST_ALIAS = "best"
REGISTERED_DESCRIPTION = (
    "GAN generator: latents (N, latent_dim) -> images (N, C, H, W) in [-1, 1]; a class-conditional one takes "
    "(N, latent_dim + 1), the class in the last column (see each version's metadata, `input`)"
)


def input_columns(payload: dict) -> tuple[int, str]:
    """(columns of the model's input, what they hold)."""
    model = payload["model"]
    if model.get("num_classes") and payload.get("class") is None:
        return model[
            "latent_dim"
        ] + 1, f"latent ({model['latent_dim']} columns), then the class (0-{model['num_classes'] - 1})"
    if model.get("num_classes"):
        return model["latent_dim"], f"latent ({model['latent_dim']} columns); draws class {payload['class']}"
    return model["latent_dim"], f"latent ({model['latent_dim']} columns)"


def signature(payload: dict):
    """Latents (and the class) in, images out; the batch dimension free."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Unnamed tensors: MLflow's PyTorch flavour feeds one array to the module, and validates the
    # input example through that same path (a named tensor arrives as a dict and is refused).
    model = payload["model"]
    image = (-1, model["channels"], model["resolution"], model["resolution"])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, input_columns(payload)[0]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), image)]),
    )


def log_generator(tracking_uri: str, experiment_id: str, run_id: str, payload: dict, tags: dict[str, str]):
    """Log the generator of a generator export payload (pipeline/export.py) as an MLflow model
    of the run, at the payload's step. Returns MLflow's ModelInfo."""
    import mlflow

    model = payload["model"]
    example = torch.Generator().manual_seed(0)
    columns, described = input_columns(payload)
    input_example = torch.randn(4, columns, generator=example)
    if columns > model["latent_dim"]:  # the class column: classes 0-3
        input_example[:, -1] = torch.arange(4) % model["num_classes"]
    input_example = input_example.numpy()
    with _fluent_store(tracking_uri, experiment_id):
        return mlflow.pytorch.log_model(
            inference_generator(payload),
            name=MODEL_NAME,
            signature=signature(payload),
            input_example=input_example,
            # Pinned to the training's torch (without a local build suffix such as +cu128): what
            # loads a torch.export program of this version. MLflow adds itself.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pt2",
            run_id=run_id,
            step=payload["step"],
            tags=tags,
            metadata={"format": payload["format"], "ema": payload["ema"], "input": described, **model},
        )


@contextlib.contextmanager
def _fluent_store(tracking_uri: str, experiment_id: str | None = None):
    """mlflow.pytorch.log_model resolves its store from the process's tracking URI, and puts the
    logged model in the active experiment, not its run's (the Default one when none is set).
    Both are read from the environment here for the call, then put back: mlflow.set_tracking_uri
    and set_experiment would leave them set for the whole process and the children it starts."""
    wanted = {"MLFLOW_TRACKING_URI": tracking_uri}
    if experiment_id is not None:
        wanted["MLFLOW_EXPERIMENT_ID"] = experiment_id
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def register(client, name: str, model_info, run_id: str, tags: dict[str, str]):
    """A new version of registered model `name` from a logged model; then the `best` alias moves
    to the version of lowest FID (versions without an FID tag are not candidates)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another run of a sweep made it first
            raise
    # The registry looks the logged model up through the process's tracking URI.
    with _fluent_store(client.tracking_uri):
        version = client.create_model_version(
            name, source=model_info.model_uri, run_id=run_id, tags=tags, model_id=model_info.model_id
        )
    link_logged_model(client, model_info.model_id, version)
    best = best_version(client, name)
    if best is not None:
        client.set_registered_model_alias(name, BEST_ALIAS, best.version)
    return version


def link_logged_model(client, model_id: str, version) -> None:
    """Tell the logged model which registry versions it became, as mlflow.register_model does
    (mlflow/tracking/_model_registry/fluent.py, _register_model, MLflow 3.17): the UI reads
    the `mlflow.modelVersions` tag to show a logged model as registered ("Model versions" on its
    page, "Registered models" in its run's table); without it, the model offers "Register
    model" again. register_model itself is not used: from a models:/ URI it would create the
    version without its run."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    versions = json.loads(existing) if existing else []
    if any((v["name"], str(v["version"])) == (version.name, str(version.version)) for v in versions):
        return  # an mlflow server links it itself when it creates the version
    versions.append({"name": version.name, "version": version.version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def best_version(client, name: str):
    """The version of lowest FID tag, the older one on a tie; None when no version has an FID."""
    scored = []
    for version in client.search_model_versions(f"name = '{name}'"):
        fid = _number(version.tags.get("fid"))
        if fid is not None:
            scored.append((fid, int(version.version), version))
    return min(scored, key=lambda item: item[:2])[2] if scored else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None

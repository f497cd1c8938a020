"""What a training run tells its tracker at its start: a pure description, and its delivery.

`describe_run` builds the run's name, tags, params, dataset inputs and set-up artifacts from
the config, the topology and the data, without MLflow (tests read it as it is); `open_run`
hands it to a Tracker. Which ranks: rank 0 (others hold a NullTracker, which ignores it).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tracking.redaction import safe_overrides

# Overrides that say where a run goes, how it is watched or how it is fed, not what it trains:
# left out of its name, which the UI cuts short in tables and legends.
PLUMBING = (
    *("tracking.", "eval.", "train.run_", "train.progress", "train.device", "data.shards", "data.workers"),
    *("data.prefetch", "data.verify", "train.log_every", "train.sample_every", "train.checkpoint_every"),
    *("train.keep_checkpoints", "train.sync_every", "deepspeed.timeout_minutes"),
)
SETUP_FILES = ("config.yaml", "ds_config_g.json", "ds_config_d.json")  # the run folder's set-up files


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as MLflow records it: name, digest, source, and a profile (counts, shape)."""

    name: str
    digest: str
    source: str
    profile: dict


@dataclass
class RunDescription:
    run_name: str
    tags: dict[str, Any]
    params: dict[str, Any]
    datasets: list[tuple[DatasetRef, str]] = field(default_factory=list)  # (dataset, context)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # (file, artifact folder)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, keys prefixed with `prefix`."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def dataset_name(source: str, split: str | None) -> str:
    """How a dataset input is named in MLflow, for training and evaluation alike: the folder of
    its manifest (or the shard pattern's file name) and the split, e.g. `mnist32_test:train`."""
    path = Path(source)
    name = path.parent.name if path.name == "manifest.json" else path.name
    return f"{name}:{split}" if split else name


def training_dataset(config, loader) -> DatasetRef:
    """The training data of a ShardedLoader: a prepared folder by its manifest's hash, a URL
    pattern by its shards and their sample counts."""
    data, model, manifest = config.data, config.model, loader.manifest
    profile = {"num_samples": loader.layout.total, "resolution": model.resolution, "channels": model.channels}
    profile["split"] = data.split
    if manifest is not None:
        source = str(manifest["_path"])
        return DatasetRef(dataset_name(source, data.split), manifest["_hash"], source, profile)
    listing = json.dumps(list(zip(loader.urls, loader.layout.counts, strict=True)))
    digest = hashlib.sha256(listing.encode()).hexdigest()
    return DatasetRef(dataset_name(data.shards, data.split), digest, data.shards, profile)


def reference_dataset(reference: dict) -> DatasetRef:
    """The FID reference set, from its statistics' description."""
    source = reference["source"]
    digest = reference.get("manifest_sha256") or hashlib.sha256(source.encode()).hexdigest()
    profile = {"num_samples": reference["n"], "split": reference.get("split")}
    return DatasetRef(dataset_name(source, reference.get("split")), digest, source, profile)


def run_title(config_name: str, overrides: list[str]) -> str:
    """The MLflow run name: the config's name and the overrides that change what it trains, keys
    without their section (`mnist32 g_optim.lr=1e-3 seed=1`), so runs read apart in the UI's
    narrow legends where a timestamped folder name was cut to `mnist32-20261...`."""
    changes = [o for o in overrides if "=" in o and not o.startswith(PLUMBING)]
    short = [o.split(".", 1)[1] if o.split("=", 1)[0].count(".") else o for o in changes]
    return " ".join([config_name, *safe_overrides(short).split()])[:250]


def identity_tags(config, world_size: int, commit: str | None) -> dict:
    """MLflow's own tags for who ran what, which fill the UI's "Created by" and "Source", and the
    run's one-line description (mlflow.note.content)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid in some containers
        user = None
    m, ds = config.model, config.deepspeed
    description = (
        f"{m.arch.upper()} {m.resolution}x{m.resolution}x{m.channels} on {config.data.shards}, "
        f"{config.loss.kind} loss, {ds.precision} ZeRO-{ds.zero_stage}, {world_size} rank(s), "
        f"{config.train.steps} steps"
    )
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": " ".join(["pipeline", *sys.argv[1:2]]) or "pipeline",
        "mlflow.note.content": description,
    }
    if user:
        tags["mlflow.user"] = user
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def describe_run(
    config,
    info,
    run_dir: Path,
    ds_configs: dict[str, dict],
    data: DatasetRef,
    manifest: dict | None,
    found_versions: dict[str, str],
    fid: dict | None = None,
    overrides: list[str] | None = None,
    config_name: str | None = None,
) -> RunDescription:
    """Everything a new run records at its start. fid: the FID set-up ({"reference": describe,
    "protocol": ...}) when FID is on. overrides: the command line's KEY=VALUE words, kept as the
    tag `overrides`; with config_name they name the run unless tracking.run_name or
    train.run_name does."""
    overrides = overrides or []
    versions = dict(found_versions)
    commit = versions.pop("git_commit", None)
    tags = {
        "run_dir": str(Path(run_dir).resolve()),
        "launcher": info.launcher,
        **identity_tags(config, info.world_size, commit),
        **config.tracking.tags,
    }
    if overrides:
        tags["overrides"] = safe_overrides(overrides)  # safe_params then drops credentials in URLs
    if fid is not None:
        tags |= {
            "fid.n_reference": fid["reference"]["n"],
            "fid.reference": json.dumps(fid["reference"]),
            "fid.protocol": json.dumps(fid["protocol"]),
        }
    named = config_name is not None and not config.train.run_name
    run_name = config.tracking.run_name or (run_title(config_name, overrides) if named else Path(run_dir).name)
    manifest = manifest or {}
    params = {
        **flatten(config.model_dump(mode="json"), "config."),
        **{key: value for network, ds in ds_configs.items() for key, value in flatten(ds, f"ds_{network}.").items()},
        "world_size": info.world_size,
        "nodes": info.nodes,
        "device": info.device.type,
        "launcher": info.launcher,
        **{f"version.{k}": v for k, v in versions.items()},
        **({"git_commit": commit} if commit else {}),
        "data.count": manifest.get("count"),
        "data.resolution": manifest.get("resolution"),
        "data.channels": manifest.get("channels"),
        "data.manifest_sha256": manifest.get("_hash"),
    }
    datasets = [(data, "training")]
    if fid is not None:
        datasets.append((reference_dataset(fid["reference"]), "evaluation"))
    artifacts = [(Path(run_dir) / name, "config") for name in SETUP_FILES]
    return RunDescription(run_name, tags, params, datasets, artifacts)


@dataclass
class Resumption:
    """A run continued from a checkpoint: its MLflow run, its step, and a world-size change."""

    run_id: str | None
    step: int
    resize: str | None = None  # how the batch was split anew, when the world size changed


def open_run(tracker, description: RunDescription, world_size: int, system_metrics_node=None, resumed=None) -> None:
    """Start the run on `tracker` (a new one, or the checkpoint's run when `resumed` names it) and
    record its description. Params are fixed at a run's start: a resumed run records only what
    changed, as tags and a metric."""
    run_id = resumed.run_id if resumed is not None else None
    tracker.start(description.run_name, run_id=run_id, tags=description.tags, system_metrics_node=system_metrics_node)
    if run_id:
        tracker.set_tags({"resumed_at_step": resumed.step})
        tracker.sync(Path(description.tags["run_dir"]), resumed.step)  # what an earlier job could not deliver
        if resumed.resize is not None:
            tracker.set_tags(
                {"world_size": world_size, "world_size_changed_at_step": resumed.step, "resize": resumed.resize}
            )
            tracker.log_metrics({"world_size": world_size}, resumed.step)
        return
    tracker.log_params(description.params)
    tracker.log_metrics({"world_size": world_size}, resumed.step if resumed is not None else 0)
    for dataset, context in description.datasets:
        tracker.log_dataset(dataset.name, dataset.digest, dataset.source, context, dataset.profile)
    for path, folder in description.artifacts:
        tracker.log_artifact(path, folder)

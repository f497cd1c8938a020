"""Checkpoints that survive a kill at any moment, and exact resume.

Layout of one run's checkpoints:

    runs/NAME/checkpoints/
        latest                  -> text: the name of the newest complete checkpoint
        best                    -> text: names protected from pruning (one per line)
        step_0000500/
            meta.json           step, epoch, config + hash, world size, versions (rank 0)
            g/, d/              each engine's state (weights, optimizer, loss scaler,
                                counters) in its own folder, written by pipeline.engines;
                                g/universal/, d/universal/ once the checkpoint was resumed
                                on another world size with ZeRO (pipeline/resize.py)
            g_weights.pt        G's weights as a plain fp32 state dict (rank 0): what
            d_weights.pt        `sample`, `export` and `eval` read, with torch alone
            ema.pt              the EMA generator (rank 0)
            client/rank_00000.pt  per rank: the trainer's state (step, loader position,
                                every random stream, counters)

The Checkpointer knows this layout and the atomic protocol, not the trainer: it is handed
the parts to save (`CheckpointParts`), each of which saves and loads its own state.

Atomicity: a checkpoint is written into `step_N.tmp/`; after every rank has written its
part (barrier), rank 0 fsyncs the files, renames the folder to `step_N/` and then
replaces `latest` (write + rename). A kill at any moment leaves `latest` naming a complete
checkpoint; half-written `.tmp` folders are removed by the next save.

Which ranks run it: every rank calls `save` and `load` (DeepSpeed requires it); rank 0
alone writes meta.json, the weight files, the shared parts and the pointers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.files import load_tensors, require_fields, write_bytes_atomic
from pipeline.versions import versions

LATEST, BEST = "latest", "best"
META_FORMAT = "gan-pipeline-checkpoint/1"
# Config keys that must match for an exact resume: they shape the models, the optimizer
# state, the data plan or the random streams. Everything else (steps, intervals, run
# folder, tracking, progress) may change between runs.
MUST_MATCH = (
    "seed",
    "model",
    "loss",
    "train.g_optim",
    "train.d_optim",
    "train.ema",
    "train.ema_decay",
    "train.ema_warmup",
    "data.batch_per_rank",
    "data.shuffle",
    "data.shuffle_window",
    "data.epoch_remainder",
    "deepspeed.precision",
    "deepspeed.zero_stage",
    "deepspeed.gradient_accumulation",
)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class EngineState(Protocol):
    """A network in its engine (pipeline.engines.Engine)."""

    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def load_resized(self, folder: Path) -> None: ...  # saved on another world size
    def save_weights(self, path: Path) -> None: ...


@dataclass
class CheckpointParts:
    """What a checkpoint holds, as the objects that save and load it."""

    engines: dict[str, EngineState]  # every rank saves/loads NAME/; rank 0 also writes NAME_weights.pt
    rank_state: Stateful  # this rank's own state: client/rank_NNNNN.pt
    shared: dict[str, Stateful] = field(default_factory=dict)  # the same on every rank: rank 0 writes NAME.pt


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# Inside MUST_MATCH sections, but free to change: a memory layout, not another model (the
# weights load into either layout).
MAY_CHANGE = ("model.channels_last",)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _compared(tree: dict, key: str):
    """The value at `key` as resume compares it: without the MAY_CHANGE settings under it."""
    value = _get(tree, key)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if f"{key}.{k}" not in MAY_CHANGE}
    return value


# On another world size the batch is split anew (pipeline/resize.py), so these may differ.
RESPLIT = ("data.batch_per_rank", "deepspeed.gradient_accumulation")


def incompatibilities(saved: dict, config: Config, world_size: int) -> list[str]:
    """What differs between a checkpoint's meta and this job, in words."""
    current, defaults = config.model_dump(mode="json"), Config().model_dump(mode="json")
    resized = saved["world_size"] != world_size
    problems = []
    for key in MUST_MATCH:
        try:
            old = _compared(saved["config"], key)
        except KeyError:  # a setting newer than the checkpoint: it ran with today's default
            old = _compared(defaults, key)
        if isinstance(old, dict):  # settings of the section newer than the checkpoint: today's defaults
            old = _compared(defaults, key) | old
        new = _compared(current, key)
        if old != new and not (resized and key in RESPLIT):
            problems.append(f"{key}: checkpoint {json.dumps(old)}, now {json.dumps(new)}")
    if resized and config.train.elastic_batch == "global":
        old_batch = saved["world_size"] * _get(saved["config"], "data.batch_per_rank")
        old_batch *= _get(saved["config"], "deepspeed.gradient_accumulation")
        new_batch = world_size * config.data.batch_per_rank * config.deepspeed.gradient_accumulation
        if old_batch != new_batch:
            problems.append(
                f"global batch: checkpoint {old_batch}, now {new_batch} (train.elastic_batch=per_rank allows a change)"
            )
    return problems


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder: what `latest` names, or, when that link
    is missing or names no complete checkpoint (a copied or hand-pruned folder), the complete
    step_N folder of the highest step. None when it holds none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    complete = [p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "meta.json").is_file()]
    return max(complete, key=lambda p: p.name) if complete else None


def work_in(run_dir: str | Path) -> list[str]:
    """What a run folder holds of a run's work (checkpoints, records, samples, an export): a new
    run there would overwrite it."""
    run_dir = Path(run_dir)
    checkpoints = list((run_dir / "checkpoints").glob("step_*"))
    found = [f"{len(checkpoints)} checkpoint folder(s)"] if checkpoints else []
    for name in ("metrics.jsonl", "fid.jsonl", "generator.pt"):
        if (run_dir / name).is_file():
            found.append(name)
    if any((run_dir / "samples").glob("step_*.png")):
        found.append("sample grids")
    return found


# What every reader of meta.json relies on (resume, export, sample, eval), and no more: a
# checkpoint of an older version that lacks a field no reader needs still opens.
META_FIELDS = {"step": int, "world_size": int, "config": dict}


def read_meta(path: str | Path) -> dict:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a complete checkpoint (no meta.json)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}/meta.json is damaged ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{path}: not a gan-pipeline checkpoint")
    require_fields(meta, META_FIELDS, f"{path}/meta.json")
    return meta


def weights_file(path: Path, network: str) -> Path:
    return Path(path) / f"{network}_weights.pt"


def shared_file(path: Path, part: str) -> Path:
    """Where rank 0 writes a shared part (the EMA: ema.pt)."""
    return Path(path) / f"{part}.pt"


def generator_state(path: str | Path, prefer_ema: bool = True) -> tuple[dict, bool, dict]:
    """(G's fp32 state dict, whether it is the EMA's, meta) of a checkpoint, read with torch
    alone: the EMA generator when the run kept one (and prefer_ema), else G's weights file."""
    path = Path(path)
    meta = read_meta(path)
    ema = shared_file(path, "ema")
    if prefer_ema and ema.is_file():
        return load_tensors(ema, "EMA file")["model"], True, meta
    weights = weights_file(path, "g")
    if not weights.is_file():
        # Only checkpoints of runs without EMA that predate the weight files lack both.
        raise UserError(
            f"checkpoint {path} has neither {ema.name} nor {weights.name}, so it cannot be read without DeepSpeed: "
            f"continue its run (`train --resume {path}`) and use a checkpoint written after that"
        )
    return load_tensors(weights, "generator weights"), False, meta


class Checkpointer:
    def __init__(self, run_dir: Path, config: Config, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.config, self.rank, self.world_size = config, rank, world_size
        self.keep = config.train.keep_checkpoints
        self.last_save_seconds = 0.0
        # What every checkpoint's meta.json says of the run beyond the training state: the
        # MLflow run to continue on a resume (pipeline/run.py sets it once the tracker started).
        self.run_meta: dict[str, Any] = {}

    def due(self, step: int) -> bool:
        """train.checkpoint_every steps, and the last step."""
        train = self.config.train
        return step % train.checkpoint_every == 0 or step == train.steps

    # ------------------------------------------------------------------- paths
    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def protected(self) -> set[str]:
        pointer = self.root / BEST
        return set(pointer.read_text().split()) if pointer.is_file() else set()

    def mark_best(self, path: Path) -> None:
        """Rank 0: keep `path` out of pruning (the checkpoint with the lowest FID so far)."""
        write_bytes_atomic(self.root / BEST, f"{path.name}\n".encode())

    # -------------------------------------------------------------------- save
    def save(self, step: int, parts: CheckpointParts, meta: dict[str, Any]) -> Path:
        """All ranks. Writes step_N.tmp, then rank 0 publishes it as step_N and moves `latest`.
        `meta` (rank 0's) joins meta.json: what a resume reads before loading any part."""
        name = f"step_{step:07d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.rank == 0:
            for stale in self.root.glob("*.tmp"):  # a save that was killed midway
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # re-saving a step (resumed run): replace it
            (tmp / "client").mkdir(parents=True)
        dist.barrier()
        started = time.perf_counter()
        for network, engine in parts.engines.items():
            engine.save(tmp / network)
        torch.save(parts.rank_state.state_dict(), tmp / "client" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            for network, engine in parts.engines.items():
                engine.save_weights(weights_file(tmp, network))
            for part_name, part in parts.shared.items():
                torch.save(part.state_dict(), shared_file(tmp, part_name))
            meta = {
                "format": META_FORMAT,
                "step": step,
                "world_size": self.world_size,
                "config": self.config.model_dump(mode="json"),
                "config_hash": config_hash(self.config),
                "versions": versions(),
                "created_unix": int(time.time()),
                **self.run_meta,
                **meta,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            _fsync_tree(tmp)
            os.replace(tmp, final)
            write_bytes_atomic(self.root / LATEST, f"{name}\n".encode())
            self._prune()
        dist.barrier()
        self.last_save_seconds = time.perf_counter() - started
        return final

    def _prune(self) -> None:
        """Rank 0: keep the newest `keep` checkpoints plus the protected ones."""
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        keep = {p.name for p in complete[-self.keep :]} | self.protected()
        for path in complete:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------------- load
    def load(self, path: Path, parts: CheckpointParts, meta: dict | None = None) -> dict:
        """All ranks. Checks that the checkpoint fits this job, then loads every part; returns meta
        (read_meta's, read here unless the caller has it)."""
        path = Path(path)
        meta = meta if meta is not None else read_meta(path)
        problems = incompatibilities(meta, self.config, self.world_size)
        if problems:
            raise UserError(f"checkpoint {path} does not fit this job:\n  " + "\n  ".join(problems))
        resized = meta["world_size"] != self.world_size
        # On another world size every rank starts from rank 0's state: its step and data
        # position are every rank's, and its random streams are derived again (pipeline/resize.py).
        rank_file = path / "client" / f"rank_{0 if resized else self.rank:05d}.pt"
        if not rank_file.is_file():
            raise UserError(f"checkpoint {path} has no state for rank {self.rank}")
        rank_state = load_tensors(rank_file, "checkpoint file")
        for network, engine in parts.engines.items():
            engine.load_resized(path / network) if resized else engine.load(path / network)
        for part_name, part in parts.shared.items():
            part.load_state_dict(load_tensors(shared_file(path, part_name), "checkpoint file"))
        parts.rank_state.load_state_dict(rank_state)
        return meta

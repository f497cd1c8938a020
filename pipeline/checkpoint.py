"""Checkpoints that survive a kill at any moment, and exact resume.

Layout of one run's checkpoints:

    runs/NAME/checkpoints/
        latest                  -> text: the name of the newest complete checkpoint
        best                    -> text: names protected from pruning (one per line)
        step_0000500/
            meta.json           step, config + hash, world size, versions (rank 0)
            g/engine/...        G's DeepSpeed engine: weights, Adam, loss scaler, counters
            d/engine/...        D's engine, in its own folder: DeepSpeed's tags and `latest`
                                file would collide if both engines shared one
            ema.pt              the EMA generator (rank 0)
            client/rank_00000.pt  per rank: step RNGs (python, numpy, torch, CUDA, the
                                step generator), loader position, counters

Atomicity: a checkpoint is written into `step_N.tmp/`; after every rank has written its
part (barrier), rank 0 fsyncs the files, renames the folder to `step_N/` and then
replaces `latest` (write + rename). A kill at any moment leaves `latest` naming a complete
checkpoint; half-written `.tmp` folders are removed by the next save.

Which ranks run it: every rank calls `save` and `load` (DeepSpeed requires it); rank 0
alone writes meta.json, ema.pt and the pointers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pipeline
from pipeline.config import Config
from pipeline.data.manifest import write_bytes_atomic
from pipeline.errors import UserError

LATEST, BEST = "latest", "best"
ENGINE_TAG = "engine"
META_FORMAT = "gan-pipeline-checkpoint/1"
# Config keys that must match for an exact resume: they shape the models, the optimizer
# state, the data plan or the random streams. Everything else (steps, intervals, run
# folder, tracking, progress) may change between runs.
MUST_MATCH = (
    "seed", "model", "loss", "train.g_optim", "train.d_optim", "train.ema", "train.ema_decay",
    "data.batch_per_rank", "data.shuffle", "data.shuffle_window", "data.epoch_remainder",
    "deepspeed.precision", "deepspeed.zero_stage", "deepspeed.gradient_accumulation",
)  # fmt: skip


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def incompatibilities(saved: dict, config: Config, world_size: int) -> list[str]:
    """What differs between a checkpoint's meta and this job, in words."""
    current = config.model_dump(mode="json")
    problems = []
    for key in MUST_MATCH:
        old, new = _get(saved["config"], key), _get(current, key)
        if old != new:
            problems.append(f"{key}: checkpoint {json.dumps(old)}, now {json.dumps(new)}")
    if saved["world_size"] != world_size:
        problems.append(
            f"world size: checkpoint {saved['world_size']}, now {world_size} (the data order and the "
            "per-rank random streams depend on it)"
        )
    return problems


def versions() -> dict:
    return {"pipeline": pipeline.__version__, "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "python": platform.python_version()}  # fmt: skip


def rng_state(step_generator: torch.Generator) -> dict:
    """Every random stream of this rank, as tensors and plain values (loadable with weights_only)."""
    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_gauss, "cached_gaussian": np_cached},  # fmt: skip
        "torch": torch.get_rng_state(),
        "step_generator": step_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, step_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    step_generator.set_state(state["step_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def _check_safe_to_unpickle(path: Path, rank: int) -> None:
    """DeepSpeed's loader calls torch.load(weights_only=False), which can run code from a crafted
    file. Open this rank's engine files with weights_only=True first: a file holding anything
    but tensors and plain containers is refused before DeepSpeed touches it."""
    files = [*path.glob("[gd]/*/*model_states.pt"), *path.glob(f"[gd]/*/*zero_pp_rank_{rank}_*.pt")]
    for file in sorted(files):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint file {file} is damaged or holds more than tensors; refused ({exc})") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (what `latest` names), or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, world_size: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep = rank, world_size, keep

    # ------------------------------------------------------------------- paths
    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def protected(self) -> set[str]:
        pointer = self.root / BEST
        return set(pointer.read_text().split()) if pointer.is_file() else set()

    def mark_best(self, path: Path) -> None:
        """Rank 0: keep `path` out of pruning (the FID issue marks its best checkpoint)."""
        write_bytes_atomic(self.root / BEST, f"{path.name}\n".encode())

    # -------------------------------------------------------------------- save
    def save(self, trainer, client_extra: dict | None = None) -> Path:
        """All ranks. Writes step_N.tmp, then rank 0 publishes it as step_N and moves `latest`."""
        name = f"step_{trainer.global_step:07d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.rank == 0:
            for stale in self.root.glob("*.tmp"):  # a save that was killed midway
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # re-saving a step (resumed run): replace it
            (tmp / "client").mkdir(parents=True)
        dist.barrier()
        started = time.perf_counter()
        trainer.g_engine.save_checkpoint(str(tmp / "g"), tag=ENGINE_TAG, save_latest=False)
        trainer.d_engine.save_checkpoint(str(tmp / "d"), tag=ENGINE_TAG, save_latest=False)
        client = {
            "rank": self.rank, "global_step": trainer.global_step, "nonfinite_streak": trainer.nonfinite_streak,
            "loader": trainer.loader.state_dict(), "rng": rng_state(trainer.rng), **(client_extra or {}),
        }  # fmt: skip
        torch.save(client, tmp / "client" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            if trainer.ema is not None:
                torch.save(trainer.ema.state_dict(), tmp / "ema.pt")
            meta = {
                "format": META_FORMAT, "step": trainer.global_step, "epoch": trainer.loader.epoch,
                "world_size": self.world_size, "config": trainer.config.model_dump(mode="json"),
                "config_hash": config_hash(trainer.config), "versions": versions(),
                "created_unix": int(time.time()), **(client_extra or {}),
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            _fsync_tree(tmp)
            os.replace(tmp, final)
            write_bytes_atomic(self.root / LATEST, f"{name}\n".encode())
            self._prune()
        dist.barrier()
        trainer.last_checkpoint_seconds = time.perf_counter() - started
        return final

    def _prune(self) -> None:
        """Rank 0: keep the newest `keep` checkpoints plus the protected ones."""
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        keep = {p.name for p in complete[-self.keep :]} | self.protected()
        for path in complete:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------------- load
    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is not a complete checkpoint (no meta.json)") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}/meta.json is damaged ({exc})") from None
        if meta.get("format") != META_FORMAT:
            raise UserError(f"{path}: not a gan-pipeline checkpoint")
        return meta

    def load(self, trainer, path: Path) -> dict:
        """All ranks. Restores engines, EMA, RNGs, loader position and counters; returns meta."""
        path = Path(path)
        meta = self.read_meta(path)
        problems = incompatibilities(meta, trainer.config, self.world_size)
        if problems:
            raise UserError(f"checkpoint {path} does not fit this job:\n  " + "\n  ".join(problems))
        client_path = path / "client" / f"rank_{self.rank:05d}.pt"
        if not client_path.is_file():
            raise UserError(f"checkpoint {path} has no state for rank {self.rank}")
        client = torch.load(client_path, map_location="cpu", weights_only=True)  # our file: tensors and plain values
        _check_safe_to_unpickle(path, self.rank)
        for network, engine in (("g", trainer.g_engine), ("d", trainer.d_engine)):
            loaded, _ = engine.load_checkpoint(str(path / network), tag=ENGINE_TAG)
            if loaded is None:
                raise UserError(f"checkpoint {path}: the {network.upper()} engine state did not load")
        if trainer.ema is not None:
            trainer.ema.load_state_dict(torch.load(path / "ema.pt", map_location=trainer.device, weights_only=True))
        trainer.global_step = client["global_step"]
        trainer.nonfinite_streak = client["nonfinite_streak"]
        trainer.loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"], trainer.rng)
        return meta

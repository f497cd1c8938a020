"""How this process was started, and the environment DeepSpeed needs.

Which ranks run it: every rank, before anything else touches torch.distributed.
DeepSpeed's init_distributed reads exactly RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; it reads no SLURM_* variable. `detect()` maps whatever launched us
(deepspeed launcher, torchrun, srun, or nothing) onto those five.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from pipeline.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    launcher: str  # deepspeed | torchrun | srun | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # nccl on GPU, gloo on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def summary(self) -> str:
        nodes = max(1, self.world_size // max(1, self.local_world_size))
        return (
            f"launcher={self.launcher} world_size={self.world_size} nodes={nodes} "
            f"ranks_per_node={self.local_world_size} backend={self.backend} device={self.device.type}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(env) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        return "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return "srun"
    return "single"


def detect(device: str = "auto") -> DistInfo:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in os.environ and describe the process."""
    env = os.environ
    launcher = _launcher(env)
    if launcher == "srun":
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        if "MASTER_ADDR" not in env:
            raise UserError("srun launch: MASTER_ADDR is not set (slurm/train.sbatch exports it)")
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif launcher == "single":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise UserError(f"launched by {launcher} but {', '.join(missing)} not set")
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda and local_world > 1 and "OMP_NUM_THREADS" not in env:
        # CPU ranks sharing a node: one thread pool per rank over all cores oversubscribes them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(
        launcher, rank, local_rank, world, local_world,
        torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), "nccl" if use_cuda else "gloo",
    )  # fmt: skip

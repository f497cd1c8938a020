"""How this process was started, and the environment DeepSpeed needs.

Which ranks run it: every rank, before anything else touches torch.distributed.
DeepSpeed's init_distributed reads exactly RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; it reads no SLURM_* variable. `detect()` maps whatever launched us
(deepspeed launcher, torchrun, srun, or nothing) onto those five.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

import torch

from pipeline.errors import PREEMPTION_SIGNALS, UserError

log = logging.getLogger("pipeline.dist")
TEARDOWN_TIMEOUT_S = 20.0  # under the 30 s that Slurm (KillWait) and the launchers give before SIGKILL


@dataclass(frozen=True)
class DistInfo:
    launcher: str  # deepspeed | torchrun | srun | env | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # nccl on GPU, gloo on CPU
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def summary(self) -> str:
        """The one-line topology that rank 0 prints."""
        devices = f"cuda x{self.local_world_size} per node" if self.device.type == "cuda" else "cpu"
        return (
            f"launcher={self.launcher} world_size={self.world_size} nodes={self.nodes} "
            f"ranks_per_node={self.local_world_size} backend={self.backend} devices={devices} "
            f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        )

    def mapping(self) -> str:
        """One line per rank: how the launcher's variables were mapped (each rank logs its own)."""
        return (
            f"rank {self.rank}/{self.world_size}: node {self.node_rank}, local_rank {self.local_rank}, "
            f"host {socket.gethostname()}, device {self.device}"
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
        _check_slurm_layout(env)
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = str(
            int(env["SLURM_NTASKS"]) // int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        )
        env["NODE_RANK"] = env.get("SLURM_NODEID", "0")
        if "MASTER_ADDR" not in env:
            raise UserError("srun launch: MASTER_ADDR is not set (slurm/train.sbatch exports the first node's address)")
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
    # deepspeed: CROSS_RANK; torchrun: GROUP_RANK; srun: NODE_RANK set above.
    node_rank = int(
        env.get("NODE_RANK") or env.get("CROSS_RANK") or env.get("GROUP_RANK") or rank // max(1, local_world)
    )
    # torchrun's agent holds the port itself; a process group of this process holds it too (a
    # command run in-process by a notebook or a test reuses that group: engines.init_distributed).
    if rank == 0 and launcher != "torchrun" and not process_group_exists():
        _check_port_free(env["MASTER_PORT"])
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda and local_world > 1 and "OMP_NUM_THREADS" not in env:
        # CPU ranks sharing a node: one thread pool per rank over all cores oversubscribes them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible")
    index = cuda_device_index(local_rank, local_world, torch.cuda.device_count()) if use_cuda else None
    if use_cuda:
        torch.cuda.set_device(index)
    return DistInfo(
        launcher,
        rank,
        local_rank,
        world,
        local_world,
        torch.device("cuda", index) if use_cuda else torch.device("cpu"),
        "nccl" if use_cuda else "gloo",
        node_rank,
    )


def cuda_device_index(local_rank: int, local_world: int, visible: int) -> int:
    """The CUDA device of this rank, among the `visible` ones it sees.

    Seeing every GPU of the node (one rank per GPU, the deepspeed launcher, torchrun, srun with
    --gpus-per-node): device local_rank. Seeing exactly one (srun --gpus-per-task=1 or
    --gpu-bind, or a CUDA_VISIBLE_DEVICES of one device per rank, as many sites set by
    default): that one, device 0."""
    if visible >= local_world:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(
        f"{local_world} ranks per node but {visible} CUDA device(s) visible to local rank {local_rank} on "
        f"{socket.gethostname()}: give each rank one GPU (srun --gpus-per-task=1) or every rank all of the "
        "node's (sbatch --gpus-per-node equal to --ntasks-per-node)"
    )


def _check_slurm_layout(env) -> None:
    """Before any rendezvous: the allocation must give every node the same number of tasks,
    and match what the job asked for (PIPELINE_EXPECT_NODES, set by the user or a script)."""
    tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if tasks % nodes:
        raise UserError(
            f"Slurm gave {tasks} tasks on {nodes} nodes: use --ntasks-per-node so every node runs the same number"
        )
    expected = env.get("PIPELINE_EXPECT_NODES")
    if expected and int(expected) != nodes:
        raise UserError(f"the job expects {expected} nodes (PIPELINE_EXPECT_NODES) but the allocation has {nodes}")


def _check_port_free(port: str) -> None:
    """Rank 0 hosts the rendezvous store on MASTER_PORT: a port in use is a clear error now,
    not a hang or a cryptic store error later."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(
                    f"MASTER_PORT {port} is already in use on {socket.gethostname()} (another job, or a stale "
                    "process of an earlier run): free it or set MASTER_PORT to another port"
                ) from None
            raise


def ignore_exit_signals() -> None:
    """Main thread, once the exit code is decided: preemption signals and Ctrl-C are ignored
    until the process ends. At interpreter exit Python resets its own handlers to SIG_DFL (but
    leaves SIG_IGN alone), so without this a second SIGTERM during the exit, as Slurm or the
    deepspeed launcher send, turned exit 75 into 143 and Slurm did not requeue the job."""
    for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def process_group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def teardown(timeout_s: float = TEARDOWN_TIMEOUT_S) -> bool:
    """Every rank, on every exit path: destroy the default process group if there is one,
    waiting at most `timeout_s` (a dead or stuck peer must not hold the exit). A process that
    exits with its process group alive could abort in gloo's threads at interpreter exit
    ("terminate called without an active exception", SIGABRT, exit 134) instead of giving its
    exit code. Returns False when the destroy did not finish in time."""
    if not process_group_exists():
        return True
    # DeepSpeed's engines hold their process groups, and reference cycles keep an engine the
    # caller dropped alive until a garbage collection. Left to interpreter finalization, its
    # gloo group is destroyed there, its threads still holding work whose tensors reference
    # Python objects: the SIGABRT of pytorch/pytorch#179291, seen at a rank's exit in the
    # 3-rank segment of tests/test_elastic.py. Collected now, while the interpreter is whole.
    gc.collect()
    done = threading.Event()

    def destroy() -> None:
        try:
            torch.distributed.destroy_process_group()
        except (RuntimeError, ValueError) as exc:  # a peer already gone: nothing left to release
            log.warning("process group teardown: %s", exc)
        finally:
            done.set()

    threading.Thread(target=destroy, name="process-group-teardown", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("the process group did not shut down within %.0f s; exiting without it", timeout_s)
        return False
    return True

"""Shared test helpers: small real datasets made on the fly, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"  # the launcher installed beside this python
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # 2 local ranks


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(extra: dict | None = None) -> dict:
    """The environment for a launched child: without this test process's own rendezvous
    variables (the in-process trainer fixture sets them), so each child starts its own."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    return {**env, **(extra or {})}


def run_cli(*args, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a real subprocess; returns the completed process."""
    return run([sys.executable, "-m", "pipeline", *map(str, args)], timeout=timeout, env=env, cwd=cwd)


def run(command: list, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=child_env(env),
    )


def make_npz(path: Path, n: int, side: int = 8, channels: int | None = None, seed: int = 0) -> tuple:
    """n random uint8 images (NHW, or NHWC when channels is set) with labels 0..9."""
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels is None else (n, side, side, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    np.savez(path, images=images, labels=labels)
    return images, labels


@pytest.fixture(params=["raw", "png"])
def small_shards(tmp_path, request):
    """103 labelled 8x8 grayscale samples in 11 shards of 10 (the last holds 3), once in each
    sample format: every loader guarantee must hold for both."""
    from pipeline.data.prepare import Transform, prepare

    images, labels = make_npz(tmp_path / "src.npz", 103)
    out = tmp_path / "shards"
    prepare(
        str(tmp_path / "src.npz"),
        out,
        Transform(resolution=8, channels=1, image_format=request.param),
        samples_per_shard=10,
        workers=1,
        progress=False,
    )
    return out, images, labels


@pytest.fixture(scope="session", autouse=True)
def no_mlruns_in_the_checkout():
    """No test leaves MLflow's ./mlruns in the folder the CLI ran from (the checkout): a local
    sqlite store keeps its artifacts beside its database (pipeline/tracking/store.py resolve_uri)."""
    before = (REPO / "mlruns").exists()
    yield
    assert before or not (REPO / "mlruns").exists(), f"a test wrote MLflow artifacts into {REPO / 'mlruns'}"


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """512 real MNIST digits at 32x32 in 4 shards (one session-wide copy; tests only read it)."""
    from pipeline.data.prepare import Transform, prepare

    out = tmp_path_factory.mktemp("mnist32")
    prepare("mnist", out, Transform(32, 1), samples_per_shard=128, limit=512, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def dist_single():
    """This pytest process as a 1-rank gloo job, for in-process DeepSpeed engines.

    The first init also JIT-compiles DeepSpeed's shm comm op (about 75 s, cached in
    TORCH_EXTENSIONS_DIR): doing it here, in one process, keeps multi-rank tests from
    compiling it concurrently."""
    from pipeline import engines
    from pipeline.dist import detect

    info = detect("cpu")
    engines.init_distributed(info, timeout_minutes=5)
    return info


def allow_cpu_fp16() -> None:
    """Tell DeepSpeed's CPU accelerator that fp16 is supported (tests only; see cpu_fp16)."""
    from pipeline.engines import accelerator

    type(accelerator()).is_fp16_supported = lambda self: True


@pytest.fixture
def cpu_fp16(monkeypatch):
    """fp16 DeepSpeed engines on this CPU, so the fp16 paths (dynamic loss scaling, skipped
    updates, the scaler's state in checkpoints) run in the suite.

    DeepSpeed's CPU accelerator reports fp16 as unsupported only because oneDNN's fp16 flag
    is off on this CPU (CPU_Accelerator.is_fp16_supported asks
    torch.ops.mkldnn._is_mkldnn_fp16_supported, deepspeed 0.19.8); torch's own CPU kernels
    run fp16 convolutions, their backward and double backward. This is the one fake of the
    fp16 tests: the arithmetic is real fp16, but not a GPU's (tensor-core accumulation and
    speed need a GPU). Child processes get it from PIPELINE_TEST_CPU_FP16=1 (tests/dist_*_job.py)."""
    from pipeline.engines import accelerator

    monkeypatch.setattr(type(accelerator()), "is_fp16_supported", lambda self: True)


def train_overrides(shards, tmp_path, *extra) -> list[str]:
    """A small, quick CPU training config on the MNIST fixture. FID is off (configs/mnist32.yaml
    turns it on for the main job); the FID tests turn it back on in `extra`. So is logging the
    generator as an MLflow model at the run's end (about 1.5 s of CPU a run: an export and
    its checks); the model tests turn it back on."""
    return [
        f"data.shards={shards}",
        "data.batch_per_rank=16",
        "data.workers=0",
        "model.g_width=16",
        "model.d_width=16",
        f"train.run_root={tmp_path}/runs",
        "train.progress=false",
        "train.log_every=1",
        "train.sample_every=1000",
        "eval.fid_every=0",
        "tracking.log_model=false",
        *extra,
    ]


def step_losses(trainer, batches, steps: int) -> list[tuple[float, float]]:
    """(loss_D, loss_G) of each of the next `steps` training steps, read as a logging step reads
    them (trainer.read_metrics: reduced over ranks; a window of one step is that step's value)."""
    losses = []
    for _ in range(steps):
        trainer.train_step(batches)
        metrics = trainer.read_metrics()
        losses.append((metrics["loss_D"], metrics["loss_G"]))
    return losses


class MlflowServer:
    """A real `mlflow server` started through launch/mlflow_server.sh, stoppable and restartable
    on the same port and store (to test outages)."""

    def __init__(self, root: Path):
        from pipeline.dist import free_port

        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> MlflowServer:
        import time
        import urllib.request

        env = child_env({"MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")})
        self.proc = subprocess.Popen(
            [
                "bash",
                str(REPO / "launch/mlflow_server.sh"),
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "server.log", "ab"),  # noqa: SIM115 (the server's own log; it outlives this call)
            start_new_session=True,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.root.mkdir()
    yield server.start()
    server.stop()

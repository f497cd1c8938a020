"""The headline: a preemption signal to any one of 2 CPU ranks under the real deepspeed
launcher checkpoints all of them and asks for a requeue (exit 75), and the resumed run is
bit-exact with an uninterrupted one: per-step losses and the final G, D and EMA weights, with
gradient accumulation and loader workers on (their state crosses the resume too).

A planned stop (N steps, then N more == 2N straight) is the same check with the stop step
fixed, so it is not run separately: each 2-rank launch costs about 25 s on 2 cores.
tests/test_checkpoint.py covers the planned stop in one process."""

import json
import signal
import subprocess
import time

import psutil
import pytest
import torch

from pipeline.dist import free_port
from pipeline.errors import EXIT_REQUEUE
from tests.conftest import DEEPSPEED, REPO, child_env, run, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow

SYNC_EVERY = 4


def launch_command(shards, tmp_path, name, steps, *extra):
    overrides = train_overrides(shards, tmp_path, f"train.steps={steps}", f"train.run_name={name}", *extra)
    return [
        DEEPSPEED,
        "--num_gpus",
        "2",
        "--master_port",
        free_port(),
        "--module",
        "pipeline",
        "train",
        "--config",
        REPO / "configs/mnist32.yaml",
        *overrides,
    ]


def per_step(run_dir):
    return [
        (r["step"], r["train/loss_D"], r["train/loss_G"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]


def final_weights(run_dir):
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    return {
        "G": load(latest / "g_weights.pt"),
        "D": load(latest / "d_weights.pt"),
        "EMA": load(latest / "ema.pt")["model"],
    }


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"rank {rank} not found")


def test_signal_to_one_rank_checkpoints_all_and_requeues(dist_single, mnist_shards, tmp_path):
    steps = 20  # the signal lands after step 3 and is acted on by step 8 or so: room to resume after it
    extra = (
        "model.g_width=64",
        "model.d_width=64",
        "train.checkpoint_every=1000",
        "deepspeed.gradient_accumulation=2",
        "data.workers=2",
        f"train.sync_every={SYNC_EVERY}",
    )
    run_dir = tmp_path / "runs" / "pre"
    launcher = subprocess.Popen(
        [str(c) for c in launch_command(mnist_shards, tmp_path, "pre", steps, *extra)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    signalled_at = len((run_dir / "metrics.jsonl").read_text().splitlines())  # steps done (log_every=1)
    rank_process(launcher, 1).send_signal(signal.SIGUSR1)  # to one rank only
    rank0 = rank_process(launcher, 0)
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("*.tmp")):
        time.sleep(0.002)
    rank0.send_signal(signal.SIGTERM)  # a second signal, while the checkpoint is being written
    _, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert "preemption signal at step" in stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [preempted] = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    assert preempted.info.status == "KILLED"
    stopped_at = per_step(run_dir)[-1][0]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:07d}" and 3 <= stopped_at < steps
    # Acted on at the first agreement after the signal: ranks agree every sync_every (4) steps,
    # and the signal may land just after one (a step of slack for the ranks' own progress).
    assert stopped_at % SYNC_EVERY == 0 and signalled_at <= stopped_at <= signalled_at + SYNC_EVERY + 1
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    resumed = run([*launch_command(mnist_shards, tmp_path, "pre", steps, *extra), "--resume", "auto"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {run_dir / 'checkpoints' / latest} at step {stopped_at}" in (run_dir / "train.log").read_text()
    )
    after = client.get_run(preempted.info.run_id)  # the same MLflow run continued, and finished
    assert after.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(after.info.run_id, "train/loss_D")] == list(range(1, steps + 1))
    straight = run(launch_command(mnist_shards, tmp_path, "straight", steps, *extra), timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_dir = tmp_path / "runs" / "straight"
    assert per_step(run_dir) == per_step(straight_dir) and len(per_step(run_dir)) == steps
    want, got = final_weights(straight_dir), final_weights(run_dir)
    for network in ("G", "D", "EMA"):
        assert want[network].keys() == got[network].keys()
        for key in want[network]:
            assert torch.equal(want[network][key], got[network][key]), f"{network}.{key}"

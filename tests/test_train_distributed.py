"""Training on 2 CPU ranks under the real launchers: deepspeed and torchrun (gloo)."""

import json
from pathlib import Path

import pytest

from pipeline.dist import free_port
from tests.conftest import DEEPSPEED, REPO, TORCHRUN_2, run, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow


@pytest.fixture
def warm_ops(dist_single):
    """dist_single has compiled DeepSpeed's shm op in one process; the ranks reuse the cache."""
    return dist_single


def test_two_ranks_identical_gradients_and_weights(warm_ops, mnist_shards, tmp_path):
    """The launcher's script form under deepspeed (it passes --local_rank). torchrun runs the
    same training in the next test, which holds its losses equal to deepspeed's step by step."""
    out = tmp_path / "evidence.json"
    result = run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            free_port(),
            "tests/dist_train_job.py",
            out,
            *train_overrides(mnist_shards, tmp_path),
        ],
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    evidence = json.loads(out.read_text())
    assert evidence["world_size"] == 2 and evidence["launcher"] == "deepspeed"
    # Only rank 0 tracks. (Rank 1 has mlflow in sys.modules all the same: DeepSpeed's
    # autotuner imports it at `import deepspeed` when installed; our code never uses it there.)
    assert evidence["tracker"] == ["MlflowTracker", "NullTracker"]
    loss0, loss1 = evidence["d_losses"]
    assert loss0 != loss1  # each rank saw its own data...
    grads0, grads1 = evidence["d_grads"]
    assert grads0 == grads1  # ...and DeepSpeed all-reduced the gradients bit-identically
    for key in ("g", "d", "ema"):
        assert evidence[key][0] == evidence[key][1], key
    assert evidence["losses"][0] == evidence["losses"][1]  # reduced metrics agree on every rank


def test_torchrun_and_deepspeed_runs_agree_and_records_are_means_over_their_steps(warm_ops, mnist_shards, tmp_path):
    """The CLI under `torchrun -m pipeline` (recording every step) and under `deepspeed --module
    pipeline` (the README's main job, recording every 3rd step), same seed and world size: each
    of deepspeed's records holds the means of torchrun's per-step values over its 3 steps. So the
    launchers run the same training, and a record read once per window (one all-reduce and one
    host copy, pipeline/step_window.py) equals what reading every step the old way gave."""
    port = free_port()
    launchers = {
        "torchrun": ([*TORCHRUN_2, "-m"], "train.log_every=1"),
        "deepspeed": ([DEEPSPEED, "--num_gpus", "2", "--master_port", port, "--module"], "train.log_every=3"),
    }
    records = {}
    for name, (launcher, log_every) in launchers.items():
        overrides = train_overrides(mnist_shards, tmp_path, "train.steps=6", f"train.run_name={name}", log_every)
        result = run(
            [*launcher, "pipeline", "train", "--config", REPO / "configs/mnist32.yaml", *overrides], timeout=300
        )
        assert result.returncode == 0, result.stderr[-4000:]
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines]
        assert f"launcher={name} world_size=2" in (tmp_path / "runs" / name / "train.log").read_text()
    every_step, windows = records["torchrun"], records["deepspeed"]
    assert [r["step"] for r in every_step] == [1, 2, 3, 4, 5, 6] and [r["steps_in_mean"] for r in every_step] == [1] * 6
    assert [r["step"] for r in windows] == [3, 6] and [r["steps_in_mean"] for r in windows] == [3, 3]
    for window, steps in zip(windows, (every_step[:3], every_step[3:]), strict=True):
        for key in (f"train/{k}" for k in ("loss_D", "loss_G", "D_x", "D_G_z", "grad_norm_D", "grad_norm_G")):
            assert window[key] == pytest.approx(sum(r[key] for r in steps) / 3, rel=1e-9, abs=1e-12), key
    # DeepSpeed's CPU shm all-reduce segments are gone after the run (it never unlinks them itself).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

"""slurm/ scripts on a real Slurm cluster started here (slurm/local_cluster.sh: slurmctld and
two slurmd nodes on this machine), 2 nodes x 2 CPU tasks: rank mapping, completion,
checkpoint and MLflow run; then preemption: signal, checkpoint, requeue, resume, and the
same final weights as the uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.dist import free_port
from tests.conftest import REPO, child_env, run_cli, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow

STEPS = 20


def _free_port_block() -> int:
    """A port p with p, p+1, p+2 free (slurmctld and the two slurmd)."""
    for _ in range(50):
        base = free_port()
        if base < 65000 and all(_is_free(base + i) for i in (1, 2)):
            return base
    raise RuntimeError("no block of 3 free ports")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not shutil.which("slurmctld") and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and this is not root (tests/run.sh installs it as root, as CI does)")
    state = tmp_path_factory.mktemp("slurm")
    env = child_env({"PIPELINE_SLURM_DIR": str(state / "cluster"), "PIPELINE_SLURM_PORT": str(_free_port_block())})
    started = subprocess.run(
        ["bash", REPO / "slurm/local_cluster.sh", "start"], capture_output=True, text=True, timeout=900, env=env
    )
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(state / "cluster/slurm.conf")
    yield env
    subprocess.run(["bash", REPO / "slurm/local_cluster.sh", "stop"], capture_output=True, timeout=60, env=env)


def sbatch(cluster, cwd, *args, env=None) -> str:
    env = {**cluster, "PYTHON": sys.executable, "PIPELINE_ROOT": str(REPO), **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        ["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True, timeout=30, env=env, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_state(cluster, job: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10, env=cluster
    )
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def wait_job(cluster, job: str, timeout_s: float) -> dict:
    """Poll until the job ends (bounded: a job that cannot start would pend forever)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(cluster, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=10, env=cluster)
    raise AssertionError(f"job {job} did not end within {timeout_s} s: {job_state(cluster, job)}")


def overrides(mnist_shards, tmp_path):
    return [
        "configs/mnist32.yaml",
        *train_overrides(
            mnist_shards, tmp_path, "train.device=cpu", f"train.steps={STEPS}", "train.checkpoint_every=10"
        ),
    ]


def mlflow_run(run_root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def signal_after_5_steps(cluster, job: str, tmp_path) -> float:
    """SIGUSR1 to every task (what --signal=USR1@180 sends) once 5 steps are logged; its time."""
    metrics = tmp_path / "runs" / f"dcgan-{job}" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline, f"job {job} made no progress: {job_state(cluster, job)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=10, env=cluster)
    return time.monotonic()


def wait_requeued(cluster, job: str, timeout_s: float = 120) -> None:
    """Until the job's script has requeued it (it pends again, a restart counted)."""
    deadline = time.monotonic() + timeout_s
    while (state := job_state(cluster, job)).get("Restarts", "0") == "0" or state.get("JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not requeued: {state}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def straight(cluster, mnist_shards, tmp_path_factory):
    """An uninterrupted 2-node x 2-task run."""
    tmp = tmp_path_factory.mktemp("straight")
    job = sbatch(
        cluster, tmp, "--nodes", 2, "--ntasks-per-node", 2, REPO / "slurm/train.sbatch", *overrides(mnist_shards, tmp)
    )
    state = wait_job(cluster, job, 300)
    log = (tmp / f"dcgan-{job}.log").read_text()
    assert state["JobState"] == "COMPLETED", log[-4000:]
    return tmp, job, log


def test_sbatch_two_nodes_maps_ranks_trains_checkpoints_and_tracks(straight):
    tmp, job, log = straight
    for rank in range(4):  # srun --label prefixes each line with the task id
        assert f"{rank}: " in log and f"rank {rank}/4: node {rank // 2}, local_rank {rank % 2}" in log
    assert "topology: launcher=srun world_size=4 nodes=2 ranks_per_node=2 backend=gloo" in log
    assert "master 127.0.0.1:" in log  # the first node's NodeAddr, not its name n1
    run_dir = tmp / "runs" / f"dcgan-{job}"
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{STEPS:07d}"
    client, run = mlflow_run(tmp / "runs")
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "4" and run.data.params["nodes"] == "2"
    assert run.data.params["launcher"] == "srun"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_D")] == list(range(1, STEPS + 1))


def test_each_node_samples_system_metrics_into_the_one_run_on_a_server(cluster, mnist_shards, tmp_path, mlflow_server):
    """2 nodes x 1 task against a real `mlflow server`: rank 0 samples node n1, local rank 0 of
    the second node samples n2, both into rank 0's run."""
    job = sbatch(
        cluster,
        tmp_path,
        "--nodes",
        2,
        "--ntasks-per-node",
        1,
        REPO / "slurm/train.sbatch",
        "configs/mnist32.yaml",
        *train_overrides(
            mnist_shards,
            tmp_path,
            "train.device=cpu",
            "train.steps=60",  # several 1-s sampling intervals: MLflow's sampler drops a last partial one
            "train.checkpoint_every=1000",
            f"tracking.uri={mlflow_server.url}",
            "tracking.system_metrics=true",
            "tracking.system_metrics_every_s=1",
        ),
    )
    state = wait_job(cluster, job, 300)
    log = (tmp_path / f"dcgan-{job}.log").read_text()
    assert state["JobState"] == "COMPLETED", log[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    for node in ("n1", "n2"):
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            assert f"system/{node}/{name}" in run.data.metrics, sorted(run.data.metrics)


def test_preempted_job_checkpoints_requeues_resumes_and_matches_the_straight_run(
    cluster, straight, mnist_shards, tmp_path
):
    """The time-limit path: SIGUSR1 to every task (what --signal=USR1@180 sends), then the
    script requeues; the requeued job resumes the same run folder and MLflow run."""
    timeline = {"submit": time.monotonic()}
    job = sbatch(
        cluster,
        tmp_path,
        "--nodes",
        2,
        "--ntasks-per-node",
        2,
        REPO / "slurm/train.sbatch",
        *overrides(mnist_shards, tmp_path),
    )
    timeline["signal"] = signal_after_5_steps(cluster, job, tmp_path)
    wait_requeued(cluster, job)
    timeline["requeued"] = time.monotonic()
    state = wait_job(cluster, job, 300)
    timeline["finished"] = time.monotonic()
    log = (tmp_path / f"dcgan-{job}.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]

    stopped_at = int(log.split("preemption signal at step ")[1].split(":")[0])
    assert 5 <= stopped_at < STEPS
    # Every task checkpointed and exited 75. Each rank's own line, labelled by srun --label: srun's
    # "Exited with exit code 75" summary merges tasks of one node ("tasks 0-1"), so it is not counted.
    for rank in range(4):
        assert f"{rank}: stopped: preemption signal at step {stopped_at}:" in log, log[-4000:]
    assert f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    assert f"resumed from {tmp_path}/runs/dcgan-{job}/checkpoints/step_{stopped_at:07d} at step {stopped_at}" in log
    assert "training exited 0" in log

    # Same final weights as the uninterrupted run: G (EMA export and its own weights) and D.
    straight_dir = straight[0] / "runs" / f"dcgan-{straight[1]}"
    run_dir = tmp_path / "runs" / f"dcgan-{job}"
    final = f"checkpoints/step_{STEPS:07d}"
    for relative in ("generator.pt", f"{final}/ema.pt", f"{final}/g_weights.pt", f"{final}/d_weights.pt"):
        a = torch.load(straight_dir / relative, map_location="cpu", weights_only=True)
        b = torch.load(run_dir / relative, map_location="cpu", weights_only=True)
        state_a = a.get("state_dict") or a.get("model") or a
        state_b = b.get("state_dict") or b.get("model") or b
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{relative}: {key} differs"

    client, run = mlflow_run(tmp_path / "runs")  # one run, continued after the requeue
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_D")] == list(range(1, STEPS + 1))
    start = timeline["submit"]
    print(
        "slurm timeline (s after submit):",
        json.dumps({k: round(v - start, 1) for k, v in timeline.items()}),
        f"signal at step {stopped_at}",
    )


def test_a_requeued_job_cut_to_one_node_resumes_in_the_same_run(cluster, mnist_shards, tmp_path):
    """2 nodes x 2 tasks (global batch 4 x 16), signalled and requeued; while it pends it is
    held, cut to 1 node with scontrol update and released: it resumes on 2 ranks, keeping the
    global batch (16 x accumulation 2) and its MLflow run, and finishes."""
    layout = ["--nodes", 2, "--ntasks-per-node", 2]
    job = sbatch(cluster, tmp_path, *layout, REPO / "slurm/train.sbatch", *overrides(mnist_shards, tmp_path))
    signal_after_5_steps(cluster, job, tmp_path)
    wait_requeued(cluster, job)
    for command in (
        ["hold", job],
        ["update", f"JobId={job}", "NumNodes=1", "NumTasks=2", "NumCPUs=2"],  # CPUs shrink with the tasks
        ["release", job],  # it starts after the requeue's delay (cred_expire: 10 s on the local cluster)
    ):
        done = subprocess.run(["scontrol", *command], capture_output=True, text=True, timeout=10, env=cluster)
        assert done.returncode == 0, done.stderr
    state = wait_job(cluster, job, 300)
    log = (tmp_path / f"dcgan-{job}.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["NumNodes"] == "1", (state, log[-3000:])
    stopped_at = int(log.split("preemption signal at step ")[1].split(":")[0])
    assert "1 node(s) [n1], 2 task(s)" in log or "1 node(s) [n2], 2 task(s)" in log
    assert "topology: launcher=srun world_size=2 nodes=1 ranks_per_node=2" in log
    resized = f"resumed from step {stopped_at}: world size 4 -> 2, global batch kept at 64 (batch 16 x accumulation 2)"
    assert resized in log, log[-4000:]
    run_dir = tmp_path / "runs" / f"dcgan-{job}"
    assert resized in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{STEPS:07d}"

    client, run = mlflow_run(tmp_path / "runs")  # one run, continued on the new world size
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["world_size_changed_at_step"] == str(stopped_at)
    history = client.get_metric_history(run.info.run_id, "train/world_size")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (stopped_at, 2.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_D")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize(
    "layout, env, message",
    [
        (
            ["--nodes", 2, "--ntasks", 3, "--ntasks-per-node", 2],
            {},
            "Slurm gave 3 tasks on 2 nodes: use --ntasks-per-node",
        ),
        (
            ["--nodes", 2, "--ntasks-per-node", 1],
            {"PIPELINE_EXPECT_NODES": "3"},
            "the job expects 3 nodes (PIPELINE_EXPECT_NODES) but the allocation has 2",
        ),
    ],
)
def test_a_wrong_allocation_fails_before_training(cluster, mnist_shards, tmp_path, layout, env, message):
    job = sbatch(cluster, tmp_path, *layout, REPO / "slurm/train.sbatch", *overrides(mnist_shards, tmp_path), env=env)
    state = wait_job(cluster, job, 180)
    log = (tmp_path / f"dcgan-{job}.log").read_text()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", log[-3000:]
    assert message in log
    assert not (tmp_path / "runs").exists()  # stopped before any rendezvous or run folder


def test_sweep_array_runs_one_training_per_line_as_children_of_one_parent_run(cluster, mnist_shards, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two runs\nseed=1 train.steps=2\n\nseed=2 train.steps=3\n")
    fid = ["eval.fid_every=2", "eval.n_generated=12", "eval.n_reference=16", "eval.batch_size=8", "eval.kid=false"]
    fid += ["eval.reference=null", "eval.floor=null"]  # the training shards: the config's test set is not made here
    args = ["configs/mnist32.yaml", str(sweep), *train_overrides(mnist_shards, tmp_path, "train.device=cpu", *fid)]
    job = sbatch(
        cluster, tmp_path, "--array=0-1", "--nodes", 1, "--ntasks-per-node", 1, REPO / "slurm/sweep.sbatch", *args
    )
    for task, steps in ((0, 2), (1, 3)):
        state = wait_job(cluster, f"{job}_{task}", 300)
        log = (tmp_path / f"dcgan-sweep-{job}_{task}.log").read_text()
        assert state["JobState"] == "COMPLETED", log[-3000:]
        assert f"array task {task} overrides: seed={task + 1} train.steps={steps}" in log
        latest = tmp_path / "runs" / f"dcgan-sweep-{job}_{task}" / "checkpoints/latest"
        assert latest.read_text().strip() == f"step_{steps:07d}"

    # MLflow: one parent run for the array, a child per task tagged with its overrides.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])}
    parent = runs.pop(f"dcgan-sweep-{job}")
    assert sorted(runs) == [f"dcgan-sweep-{job}_0", f"dcgan-sweep-{job}_1"]
    for task, child in enumerate(runs[f"dcgan-sweep-{job}_{t}"] for t in (0, 1)):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert f"seed={task + 1} train.steps={task + 2}" in child.data.tags["overrides"]
    best = min(runs.values(), key=lambda r: r.data.metrics["eval/best_fid"])
    assert parent.data.metrics["eval/best_fid"] == best.data.metrics["eval/best_fid"]
    assert parent.data.tags["best_child"] == best.info.run_name and parent.info.status == "FINISHED"
    compared = run_cli("runs", "compare", f"dcgan-sweep-{job}", "--run-root", tmp_path / "runs", "--json")
    assert compared.returncode == 0, compared.stderr[-2000:]
    table = json.loads(compared.stdout)
    assert [row["run"] for row in table["children"]] == sorted(
        runs, key=lambda n: runs[n].data.metrics["eval/best_fid"]
    )
    assert table["differing_params"] == ["seed", "train.steps"]
    rows = {(row["seed"], row["train.steps"], row["step"]) for row in table["children"]}
    assert rows == {("1", "2", 2), ("2", "3", 3)}


def test_prepare_as_an_array_then_the_merge_equals_one_process(cluster, tmp_path):
    """slurm/prepare.sbatch as a 3-task array over a foreign shard set; its first task submits
    the merge, which runs after all three. The merged dataset holds exactly what one process
    prepares from the same source: keys, bytes, labels, splits, in order."""
    from pipeline.data.prepare import Transform, prepare
    from tests.test_prepare_parts import samples, writer_shards

    source = writer_shards(tmp_path / "foreign", shards=4, per_shard=5, broken={"sample_0259x7"})
    options = ["--resolution", 16, "--channels", 3, "--samples-per-shard", 4, "--val-fraction", 0.25]
    array = sbatch(
        cluster, tmp_path, "--array=0-2", "--cpus-per-task=1", REPO / "slurm/prepare.sbatch", source, "out", *options
    )
    for task in range(3):
        assert wait_job(cluster, f"{array}_{task}", 180)["JobState"] == "COMPLETED"
    log = (tmp_path / f"prepare-{array}_0.log").read_text()
    merge = log.split("slurm: merge job ")[1].split()[0]
    assert wait_job(cluster, merge, 180)["JobState"] == "COMPLETED", (
        tmp_path / f"prepare-merge-{merge}.log"
    ).read_text()
    prepare(source, tmp_path / "whole", Transform(16, 3), samples_per_shard=4, val_fraction=0.25, progress=False)
    assert samples(tmp_path / "out") == samples(tmp_path / "whole")
    assert len((tmp_path / "out/rejects.jsonl").read_text().splitlines()) == 1

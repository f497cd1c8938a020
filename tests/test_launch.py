"""launch/ wrappers over the real launchers: two "nodes" on this machine forming one 4-rank
job and the errors that must come before training. A killed rank ending the job in bounded
time: bench/rank_failure.py, run by tests/test_benchmarks.py."""

import socket
import subprocess
import sys

import pytest

from pipeline.dist import free_port
from tests.conftest import REPO, child_env, run, run_cli, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow


def wrapper_env(**extra) -> dict:
    return child_env({"PYTHON": sys.executable, **{k: str(v) for k, v in extra.items()}})


def launch(script: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return run(["bash", REPO / "launch" / script, *args], timeout=timeout, env=env or wrapper_env())


def test_two_nodes_without_ssh_form_one_four_rank_job(mnist_shards, tmp_path):
    """Two invocations of the no-ssh wrapper, node ranks 0 and 1, on one machine: the two
    hostfile names are this machine's two loopback names."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes', both this machine\n127.0.0.1 slots=2\nlocalhost slots=2\n")
    env = wrapper_env(MASTER_PORT=free_port())
    args = [
        "configs/mnist32.yaml",
        *train_overrides(mnist_shards, tmp_path, "train.device=cpu", "train.steps=3", "train.run_name=two-nodes"),
    ]
    nodes = [
        subprocess.Popen(
            ["bash", REPO / "launch/multi_node_no_ssh.sh", "--hostfile", hostfile, "--node-rank", str(rank), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    assert "+ " in outputs[0] and "--no_ssh --node_rank 0" in outputs[0]  # the exact command, printed
    assert "topology: launcher=deepspeed world_size=4 nodes=2 ranks_per_node=2" in outputs[0]
    for rank in (0, 1):
        assert f"rank {rank}/4: node 0, local_rank {rank}" in outputs[0]
    for rank in (2, 3):
        assert f"rank {rank}/4: node 1, local_rank {rank - 2}" in outputs[1]
    assert (tmp_path / "runs/two-nodes/checkpoints/latest").read_text().strip() == "step_0000003"


def test_wrapper_errors_come_before_any_launch(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=8\n")
    cases = [
        (["multi_node.sh", "--hostfile", tmp_path / "missing", "configs/mnist32.yaml"], "hostfile not found"),
        (["multi_node.sh", "--hostfile", hostfile, "--nodes", "3", "configs/mnist32.yaml"], "--nodes 3 but hostfile"),
        (["multi_node.sh", "configs/mnist32.yaml"], "--hostfile FILE is required"),
        (
            ["multi_node_no_ssh.sh", "--hostfile", hostfile, "--node-rank", "2", "configs/mnist32.yaml"],
            "--node-rank 2 but hostfile",
        ),
        (["multi_node_no_ssh.sh", "--hostfile", hostfile, "configs/mnist32.yaml"], "--node-rank R is required"),
        (["torchrun.sh", "--nodes", "2", "--node-rank", "1", "configs/mnist32.yaml"], "set MASTER_PORT"),
        (["single_node.sh", "--gpus", "2", "configs/nope.yaml"], "config not found: configs/nope.yaml"),
    ]
    for args, message in cases:
        result = launch(*args, timeout=30)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_port_in_use_is_a_clear_error_before_training(mnist_shards, tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "train",
            *train_overrides(mnist_shards, tmp_path, "train.steps=1"),
            env={"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"},
        )
    assert result.returncode == 2
    assert f"MASTER_PORT {port} is already in use" in result.stderr
    assert not (tmp_path / "runs").exists()

"""Every way `pipeline train` ends gives its exact exit code, every time (Slurm requeues on 75
only): success, a user error after the process group is up, divergence, and preemption with
a second signal during the exit. Single-process runs go two at a time, so the machine is
busy, as it is on a shared node; bench/exit_codes.py repeats this 200 times.

Also the commands' own bad-input exits: a truncated .npz, an unwritable output folder, and
`eval --real A --real B` checking B before any work on A."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run, run_cli

sys.path.insert(0, str(REPO / "bench"))
from exit_codes import EXPECTED, run_ending

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow


def test_single_process_endings_give_their_exit_code_and_no_traceback():
    """bench/exit_codes.py itself (its smoke run too), each ending once, two runs at a time."""
    result = run([sys.executable, REPO / "bench/exit_codes.py", "--each", "1", "--parallel", "2"], timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["figures"]["wrong_exit_codes"] == 0, result.stdout[-4000:]
    assert line["figures"]["runs_per_ending"] == {f"{ending}/1": 1 for ending in EXPECTED}


@pytest.mark.parametrize("ending", ["user_error", "divergence", "preemption"])
def test_two_rank_endings_give_their_exit_code(dist_single, mnist_shards, tmp_path, ending):
    """Success on 2 ranks is checked by tests/test_train_distributed.py (exit 0 under both launchers)."""
    from pipeline.dist import free_port

    code, tail = run_ending(ending, 2, mnist_shards, tmp_path / "runs", free_port(), random.Random(1))
    assert code == EXPECTED[ending], tail
    assert "Traceback" not in tail, tail


def test_truncated_npz_is_a_one_line_error(tmp_path):
    np.savez(tmp_path / "ok.npz", images=np.zeros((20, 8, 8), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:300])
    result = run_cli("prepare", tmp_path / "cut.npz", tmp_path / "out", "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'cut.npz'}: not a readable .npz (BadZipFile" in result.stderr


def test_unwritable_output_folder_is_a_one_line_error(tmp_path):
    """As root, permissions do not stop a write: the folder is made immutable (chattr +i) instead."""
    np.savez(tmp_path / "ok.npz", images=np.zeros((20, 8, 8), np.uint8))
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here, and root ignores permissions")
    else:
        locked.chmod(0o555)
    try:
        for out in (locked, locked / "new"):
            result = run_cli("prepare", tmp_path / "ok.npz", out, "--no-progress")
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert f"cannot write into {out} (" in result.stderr
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        else:
            locked.chmod(0o755)


def test_eval_checks_both_datasets_before_any_work(tmp_path):
    """B is empty: the error names B before A's statistics, or even the Inception weights, are
    touched (weights that do not exist would be the first error otherwise)."""
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i).save(tmp_path / "a" / f"{i}.png")
    result = run_cli(
        "eval", "--real", tmp_path / "a", "--real", tmp_path / "b", f"eval.inception_weights={tmp_path}/none.pt"
    )
    assert result.returncode == 2 and f"FID: {tmp_path / 'b'} holds no images" in result.stderr, result.stderr

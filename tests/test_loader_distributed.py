"""The loader on real gloo ranks started by torchrun: no rank runs short, no sample is read twice."""

import json
import subprocess

import pytest

from tests.conftest import REPO, TORCHRUN_2

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow


def test_two_gloo_ranks_stream_disjoint_equal_epochs(small_shards, tmp_path):
    shards, _, _ = small_shards
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            *TORCHRUN_2,
            "tests/dist_loader_job.py",
            str(shards),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["batches"] for r in ranks] == [103 // 8, 103 // 8]
    rank0, rank1 = (set(r["keys"]) for r in ranks)
    assert len(rank0) == len(rank1) == 12 * 4 and not rank0 & rank1

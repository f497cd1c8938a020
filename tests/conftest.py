"""Shared test helpers: small real datasets made on the fly, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a real subprocess; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})},
    )  # fmt: skip


def make_npz(path: Path, n: int, side: int = 8, channels: int | None = None, seed: int = 0) -> tuple:
    """n random uint8 images (NHW, or NHWC when channels is set) with labels 0..9."""
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels is None else (n, side, side, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    np.savez(path, images=images, labels=labels)
    return images, labels


@pytest.fixture
def small_shards(tmp_path):
    """103 labelled 8x8 grayscale samples in 11 shards of 10 (the last holds 3)."""
    from pipeline.data.prepare import Transform, prepare

    images, labels = make_npz(tmp_path / "src.npz", 103)
    out = tmp_path / "shards"
    prepare(str(tmp_path / "src.npz"), out, Transform(resolution=8, channels=1), samples_per_shard=10,
            workers=1, progress=False)  # fmt: skip
    return out, images, labels

"""The versions a run depends on, recorded in every checkpoint and in the MLflow run's params."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pipeline

# name in the record -> distributions to ask, first found wins (mlflow-skinny alone is enough
# for a client that logs to a server)
PACKAGES = {
    "torch": ("torch",),
    "deepspeed": ("deepspeed",),
    "webdataset": ("webdataset",),
    "mlflow": ("mlflow", "mlflow-skinny"),
}


def versions() -> dict[str, str]:
    """pipeline, python, torch, deepspeed, webdataset, mlflow (those installed), and git_commit
    when the code runs from a git checkout."""
    found = {"pipeline": pipeline.__version__, "python": platform.python_version()}
    for name, distributions in PACKAGES.items():
        for distribution in distributions:
            try:
                found[name] = version(distribution)
                break
            except PackageNotFoundError:
                continue
    commit = _git_commit()
    if commit:
        found["git_commit"] = commit
    return found


@cache  # one subprocess per process
def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None

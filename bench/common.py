"""Shared by the benchmarks: machine description and the closing JSON line."""

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(name: str, figures: dict, baseline: dict, ratio: float, **extra) -> None:
    """Every benchmark ends with exactly this one JSON line."""
    print(
        json.dumps(
            {
                "benchmark": name,
                "figures": figures,
                "baseline": baseline,
                "ratio": round(ratio, 3),
                "machine": machine(),
                **extra,
            }
        )
    )


def stat_cpu_s(stat: str) -> tuple[float, int]:
    """(CPU seconds, user + system; parent pid) from a Linux /proc/.../stat file: fields 14, 15, 4."""
    fields = Path(stat).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])


def thread_cpu_s(exclude: frozenset[int] = frozenset()) -> tuple[float, set[int]]:
    """CPU seconds of this process's threads but `exclude`, and the set of threads read."""
    total, read = 0.0, set()
    for tid in {int(t) for t in os.listdir("/proc/self/task")} - exclude:
        try:
            total += stat_cpu_s(f"/proc/self/task/{tid}/stat")[0]
        except FileNotFoundError:  # the thread ended
            continue
        read.add(tid)
    return total, read


def children_cpu_s() -> float:
    """CPU seconds of this process's live child processes (say, DataLoader workers). A figure
    that a busy machine moves far less than it moves wall-clock rates."""
    total, me = 0.0, os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seconds, parent = stat_cpu_s(f"/proc/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):  # the process ended
            continue
        total += seconds if parent == me else 0.0
    return total

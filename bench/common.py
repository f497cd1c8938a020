"""Shared by the benchmarks: machine description and the closing JSON line."""

import json
import os
import platform

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

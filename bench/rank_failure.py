"""How fast a job ends after one rank dies: SIGKILL of local rank 1 of a 2-rank CPU run under
launch/single_node.sh (the deepspeed launcher) and launch/torchrun.sh.

    python bench/rank_failure.py [--repeats 3]

Figures: seconds from the kill to the launcher's exit, per launcher (median of the repeats).
Baseline: the deepspeed launcher, run in the same session; the ratio is torchrun / deepspeed.
For scale, a job whose launcher did not notice would wait for the collective timeout
(deepspeed.timeout_minutes). The suite runs it once (tests/test_benchmarks.py) and bounds
both launchers at 25 s, under the deepspeed launcher's 30 s SIGTERM-to-SIGKILL grace: the
surviving rank must exit by itself, not be killed. (It used not to: its SIGTERM-ignoring
loader worker kept it in an unbounded join at exit.)
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import mnist_shards, report

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {"deepspeed": "single_node.sh", "torchrun": "torchrun.sh"}


def rank_process(launcher_pid: int, local_rank: int, timeout_s: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank) and "pipeline" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise RuntimeError(f"no rank process with LOCAL_RANK={local_rank} after {timeout_s} s")


def seconds_to_end(script: str, shards: Path, run_root: Path) -> tuple[float, int]:
    """Start a long 2-rank run (a loader worker per rank), kill local rank 1 once training has
    logged 2 steps; the seconds to the launcher's exit (bounded at 300 s: past that the job is
    reported as hung) and its exit code."""
    args = [
        "--gpus",
        "2",
        "configs/mnist32.yaml",
        f"data.shards={shards}",
        "data.batch_per_rank=16",
        "model.g_width=16",
        "model.d_width=16",
        f"train.run_root={run_root}",
        "train.progress=false",
        "train.log_every=1",
        "train.steps=100000",
        "train.device=cpu",
        "data.workers=1",
        "eval.fid_every=0",
        "tracking.enabled=false",
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    launcher = subprocess.Popen(
        ["bash", REPO / "launch" / script, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(len(m.read_text().splitlines()) >= 2 for m in run_root.glob("*/metrics.jsonl")):
            if launcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{script}: training never started (exit {launcher.poll()})")
            time.sleep(0.3)
        victim = rank_process(launcher.pid, 1)
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        code = launcher.wait(timeout=300)
        return time.monotonic() - killed, code
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from pipeline.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "mnist32"
        mnist_shards(shards, samples_per_shard=128, workers=1)
        seconds, codes = {name: [] for name in LAUNCHERS}, {name: [] for name in LAUNCHERS}
        for repeat in range(args.repeats):
            for name, script in LAUNCHERS.items():
                took, code = seconds_to_end(script, shards, Path(tmp) / f"runs-{name}-{repeat}")
                seconds[name].append(took)
                codes[name].append(code)
                print(
                    f"[{repeat + 1}/{args.repeats}] {name}: job ended {seconds[name][-1]:.1f} s after the kill",
                    flush=True,
                )
    median = {name: round(statistics.median(s), 2) for name, s in seconds.items()}
    report(
        "rank_failure",
        {
            "torchrun_seconds_to_end": median["torchrun"],
            "slowest_seconds_to_end": {name: round(max(s), 2) for name, s in seconds.items()},
            "exit_codes": codes,
            "repeats": args.repeats,
        },
        {"deepspeed_seconds_to_end": median["deepspeed"]},
        median["torchrun"] / median["deepspeed"],
        collective_timeout_s=load_config(None, []).deepspeed.timeout_minutes * 60,
    )


if __name__ == "__main__":
    main()

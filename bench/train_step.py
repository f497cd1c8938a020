"""Training-step images/s: our Trainer (two DeepSpeed engines) vs a plain PyTorch loop.

Same DCGAN models, batch, algorithm (D step on real + detached fake, then G step through a
frozen D) and in-memory data; the plain loop uses torch.optim.Adam and no DeepSpeed.
One process on CPU (or the GPU when there is one), fp32, world size 1. Steps alternate in
rounds (ours, plain, ours with model.channels_last, ...) so all see the same machine state.

    python bench/train_step.py [--resolution 32] [--batch 64] [--steps 30] [--rounds 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from pipeline import engines
from pipeline.config import load_config
from pipeline.data.loader import Batch
from pipeline.data.prepare import Transform, prepare
from pipeline.dist import detect
from pipeline.images import from_uint8
from pipeline.models.dcgan import Discriminator, Generator
from pipeline.train import Trainer


class PlainLoop:
    """The reference DCGAN step, written the plain way: torch.optim.Adam, no DeepSpeed, no EMA.
    precision bf16/fp16: torch.autocast, and for fp16 a GradScaler (torch's AMP recipe)."""

    def __init__(self, config, device, precision: str = "fp32"):
        torch.manual_seed(config.seed)
        m = config.model
        self.g = Generator(m.resolution, m.channels, m.latent_dim, m.g_width).to(device)
        self.d = Discriminator(m.resolution, m.channels, m.d_width, m.d_norm).to(device)
        o = config.train
        self.g_opt = torch.optim.Adam(self.g.parameters(), lr=o.g_optim.lr, betas=o.g_optim.betas)
        self.d_opt = torch.optim.Adam(self.d.parameters(), lr=o.d_optim.lr, betas=o.d_optim.betas)
        self.latent_dim, self.device = m.latent_dim, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, real):
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device)
        with self.autocast():
            with torch.no_grad():
                fake = self.g(z)
            d_loss = F.softplus(-self.d(real)).mean() + F.softplus(self.d(fake)).mean()
        self.d_opt.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.step(self.d_opt)
        self.d.requires_grad_(False)
        with self.autocast():
            g_loss = F.softplus(-self.d(self.g(torch.randn_like(z)))).mean()
        self.g_opt.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.g_opt)
        self.scaler.update()
        self.d.requires_grad_(True)
        return d_loss.detach(), g_loss.detach()  # not read back: a good plain loop does not wait every step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(
            "mnist",
            Path(tmp) / "shards",
            Transform(args.resolution, args.channels),
            limit=args.batch * 4,
            progress=False,
        )

        def config_with(*extra):
            return load_config(
                None,
                [
                    f"data.shards={tmp}/shards",
                    f"data.batch_per_rank={args.batch}",
                    "data.workers=0",
                    f"model.resolution={args.resolution}",
                    f"model.channels={args.channels}",
                    f"train.run_root={tmp}/runs",
                    "train.progress=false",
                    *extra,
                ],
            )

        config = config_with()
        info = detect()
        engines.init_distributed(info, 5)
        trainer = Trainer(config, info, Path(tmp) / "runs" / "bench")
        nhwc = Trainer(config_with("model.channels_last=true"), info, Path(tmp) / "runs" / "bench_nhwc")
        plain = PlainLoop(config, info.device)
        pixels = torch.randint(0, 256, (args.batch, args.resolution, args.resolution, args.channels), dtype=torch.uint8)
        in_memory = Batch(pixels, None, [], 0)  # uint8 NHWC, as the loader delivers; ours scales it each step
        real = from_uint8(pixels.to(info.device))  # the plain loop gets it ready-made
        batches = iter(lambda: in_memory, None)  # the same in-memory batch forever

        def ours_rate(trainer=trainer):
            started = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(batches)
            return args.steps * args.batch / (time.perf_counter() - started)

        def plain_rate():
            started = time.perf_counter()
            for _ in range(args.steps):
                plain.step(real)
            return args.steps * args.batch / (time.perf_counter() - started)

        ours_rate(), plain_rate(), ours_rate(nhwc)  # warm-up
        ours, base, channels_last = [], [], []
        for r in range(args.rounds):
            ours.append(ours_rate())
            base.append(plain_rate())
            channels_last.append(ours_rate(nhwc))
            print(
                f"round {r + 1}/{args.rounds}: ours {ours[-1]:.1f} img/s, plain {base[-1]:.1f} img/s, "
                f"ours with channels_last {channels_last[-1]:.1f} img/s",
                flush=True,
            )
        ours_best, base_best, nhwc_best = max(ours), max(base), max(channels_last)
        print(
            f"ours (DeepSpeed engines): {ours_best:.1f} images/s; plain PyTorch: {base_best:.1f} images/s; "
            f"ratio {ours_best / base_best:.3f} (goal >= 0.95); with model.channels_last: {nhwc_best:.1f} "
            f"images/s, {nhwc_best / ours_best:.3f}x ours"
        )
        report(
            "train_step",
            {
                "images_per_s": round(ours_best, 1),
                "rounds": [round(x, 1) for x in ours],
                "channels_last_images_per_s": round(nhwc_best, 1),
                "channels_last_rounds": [round(x, 1) for x in channels_last],
                "channels_last_over_nchw": round(nhwc_best / ours_best, 3),
            },
            {
                "images_per_s": round(base_best, 1),
                "rounds": [round(x, 1) for x in base],
                "what": "plain PyTorch loop, torch.optim.Adam, same models/batch/data",
            },
            ours_best / base_best,
            resolution=args.resolution,
            batch=args.batch,
            precision="fp32",
            device=str(info.device),
        )


if __name__ == "__main__":
    main()

"""Training-step images/s: our Trainer (two DeepSpeed engines) vs a plain PyTorch loop.

Same DCGAN models, batch, algorithm (D step on real + detached fake, then G step through a
frozen D) and in-memory data; the plain loop (harness.PlainLoop) uses torch.optim.Adam and no
DeepSpeed. One process on CPU (or the GPU when there is one), fp32, world size 1. Steps
alternate in rounds (ours, plain, ours with model.channels_last, ...) so all see the same
machine state.

    python bench/train_step.py [--resolution 32] [--batch 64] [--steps 30] [--rounds 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PlainLoop, bench_config, bench_trainer, interleaved_rounds, mnist_shards, report, single_rank

from pipeline.data.loader import Batch
from pipeline.images import from_uint8


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = mnist_shards(tmp / "shards", args.resolution, args.channels, limit=args.batch * 4)
        size = [f"data.batch_per_rank={args.batch}", f"model.resolution={args.resolution}"]
        size.append(f"model.channels={args.channels}")
        config = bench_config(shards, tmp / "runs", *size)
        info = single_rank()
        trainer = bench_trainer(config, info, tmp / "runs" / "bench")
        nhwc = bench_trainer(bench_config(shards, tmp / "runs", *size, "model.channels_last=true"), info, tmp / "n")
        plain = PlainLoop(config, info.device)
        pixels = torch.randint(0, 256, (args.batch, args.resolution, args.resolution, args.channels), dtype=torch.uint8)
        in_memory = Batch(pixels, None, [], 0)  # uint8 NHWC, as the loader delivers; ours scales it each step
        real = from_uint8(pixels.to(info.device))  # the plain loop gets it ready-made
        batches = iter(lambda: in_memory, None)  # the same in-memory batch forever

        def rate(step):
            def measure():
                started = time.perf_counter()
                for _ in range(args.steps):
                    step()
                return args.steps * args.batch / (time.perf_counter() - started)

            return measure

        rounds = interleaved_rounds(
            {
                "ours": rate(lambda: trainer.train_step(batches)),
                "plain": rate(lambda: plain.step(real)),
                "ours_channels_last": rate(lambda: nhwc.train_step(batches)),
            },
            args.rounds,
            " img/s",
        )
        ours, base, channels_last = rounds["ours"], rounds["plain"], rounds["ours_channels_last"]
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
                "what": "plain PyTorch loop (harness.PlainLoop), torch.optim.Adam, same models/batch/data",
            },
            ours_best / base_best,
            resolution=args.resolution,
            batch=args.batch,
            precision="fp32",
            device=str(info.device),
        )


if __name__ == "__main__":
    main()

"""Checkpoint save/load time and size for the 64x64 DCGAN pair (fp32, Adam states) on CPU.

Ours: Trainer.save_checkpoint (both DeepSpeed engines, their plain fp32 weight files, EMA,
per-rank trainer state, fsync, atomic publish) and Trainer.resume (with the weights_only
safety pass) into a fresh Trainer.
Baseline, same process: plain torch.save / torch.load of G, D, EMA and both Adam state dicts.

    python bench/checkpoint_io.py [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_config, bench_trainer, mnist_shards, report, single_rank


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = mnist_shards(tmp / "shards", 64, 3, limit=256)
        size = ["data.batch_per_rank=16", "model.resolution=64", "model.channels=3", "train.keep_checkpoints=100"]
        config = bench_config(shards, tmp / "runs", *size)
        info = single_rank()
        trainer = bench_trainer(config, info, tmp / "runs" / "bench")
        batches = trainer.loader.forever()
        trainer.train_step(batches)  # Adam states exist from here on
        params = sum(p.numel() for p in trainer.g_engine.module.parameters()) + sum(
            p.numel() for p in trainer.d_engine.module.parameters()
        )

        save_s, load_s, base_save_s, base_load_s = [], [], [], []
        for i in range(args.repeats):
            trainer.global_step = i + 1
            started = time.perf_counter()
            path = trainer.save_checkpoint()
            save_s.append(time.perf_counter() - started)
            fresh = bench_trainer(config, info, tmp / "runs" / "bench")
            started = time.perf_counter()
            fresh.resume(path)
            load_s.append(time.perf_counter() - started)

            state = {
                "G": trainer.g_engine.module.state_dict(),
                "D": trainer.d_engine.module.state_dict(),
                "EMA": trainer.ema.state_dict(),
                "optG": trainer.g_engine.engine.optimizer.state_dict(),
                "optD": trainer.d_engine.engine.optimizer.state_dict(),
            }
            baseline = tmp / f"plain_{i}.pt"
            started = time.perf_counter()
            torch.save(state, baseline)
            with open(baseline, "rb") as f:
                os.fsync(f.fileno())
            base_save_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            torch.load(baseline, weights_only=True)
            base_load_s.append(time.perf_counter() - started)

        size, base_size = folder_bytes(path), baseline.stat().st_size
        save, load = statistics.median(save_s), statistics.median(load_s)
        base_save, base_load = statistics.median(base_save_s), statistics.median(base_load_s)
        print(f"64x64 DCGAN pair: {params / 1e6:.2f} M parameters (fp32, with Adam states and EMA)")
        print(f"ours:  save {save:.3f} s, load {load:.3f} s, {size / 1e6:.1f} MB on disk")
        print(f"plain: save {base_save:.3f} s, load {base_load:.3f} s, {base_size / 1e6:.1f} MB (one torch.save)")
        print(
            f"ratios (ours / plain): save {save / base_save:.2f}, load {load / base_load:.2f}, "
            f"size {size / base_size:.2f}"
        )
        report(
            "checkpoint_io",
            {"save_s": round(save, 4), "load_s": round(load, 4), "bytes": size},
            {
                "save_s": round(base_save, 4),
                "load_s": round(base_load, 4),
                "bytes": base_size,
                "what": "one torch.save/torch.load of G, D, EMA and both Adam state dicts",
            },
            save / base_save,
            load_ratio=round(load / base_load, 3),
            size_ratio=round(size / base_size, 3),
            parameters=params,
            repeats=args.repeats,
        )


if __name__ == "__main__":
    main()

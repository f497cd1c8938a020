"""Loader images/s per worker: raw and png shards through our sharded loader, against a
plain torch DataLoader over one PNG file per image (the usual Pillow-folder baseline).

The images are real MNIST digits, upscaled to RESxRES RGB by `pipeline prepare` (once as
raw, once as png; the folder baseline gets the same PNG bytes as files). Every side runs
ONE worker process, batch 128, shuffled, and delivers uint8 N x H x W x C batches: the
scaling to [-1, 1] happens on the device in the trainer, so it is left out of every side.
Each side keeps its worker across epochs (ours: `forever()`, as the trainer reads it; the
baseline: persistent_workers) and runs one warm-up epoch, then --epochs timed epochs.

Next to images/s, each side reports its worker's CPU time per image (read from /proc): on a
shared machine other jobs move the wall-clock rates by tens of percent, and the CPU time far
less, so A/B comparisons of the loader's own cost use that figure.

MNIST's mostly black digits make unusually small PNGs that decode faster than photos,
so png's figures here are an upper bound and raw's lead over png a lower bound.

    python bench/loader_throughput.py [--images 10000] [--epochs 2] [--resolutions 64,128]
"""

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import children_cpu_s, mnist_shards, report

from pipeline.config import DataConfig
from pipeline.data.loader import ShardedLoader
from pipeline.data.manifest import load_manifest, manifest_shards
from pipeline.data.shards import iter_samples

BATCH, WORKERS = 128, 1


class PngFiles(Dataset):
    """The usual baseline: one PNG file per image, decoded with Pillow in the workers."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(Image.open(self.paths[i]).convert("RGB"), dtype=np.uint8))


def timed(batches, count: int) -> tuple[float, float]:
    """(images/s, worker CPU microseconds per image) over the next `count` batches of `batches`."""
    images, started, worker_cpu = 0, time.perf_counter(), children_cpu_s()
    for batch in itertools.islice(batches, count):
        images += batch.shape[0]
    return images / (time.perf_counter() - started), (children_cpu_s() - worker_cpu) / images * 1e6


def measure(tmp: Path, resolution: int, images: int, epochs: int) -> dict:
    """images/s of raw and png shards through our loader and of the PNG-folder baseline."""
    rates, worker_us = {}, {}
    for fmt in ("raw", "png"):
        shards = tmp / f"{fmt}{resolution}"
        mnist_shards(shards, resolution, 3, limit=images, image_format=fmt)
        print(f"{fmt} {resolution}x{resolution}: {images} images prepared", flush=True)
        config = DataConfig(shards=str(shards), batch_per_rank=BATCH, workers=WORKERS)
        loader = ShardedLoader(config, seed=0)
        batches = (b.images for b in loader.forever())  # as the trainer reads it: workers start once
        timed(batches, len(loader))  # warm-up
        rates[fmt], worker_us[fmt] = timed(batches, epochs * len(loader))
        print(f"  sharded loader, {fmt}: {rates[fmt]:,.0f} images/s, worker {worker_us[fmt]:.1f} us/image", flush=True)
        batches.close()  # stops its worker, which would otherwise count as the next side's
    files = tmp / f"files{resolution}"
    files.mkdir()
    paths = []
    for entry in manifest_shards(load_manifest(tmp / f"png{resolution}"), "train"):
        for _, key, sample in iter_samples(entry.url):
            paths.append(files / f"{key}.png")
            paths[-1].write_bytes(sample["png"])
    plain = DataLoader(
        PngFiles(paths), batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True, persistent_workers=True
    )
    batches = (batch for _ in itertools.count() for batch in plain)
    timed(batches, len(plain))
    rates["png_folder"], worker_us["png_folder"] = timed(batches, epochs * len(plain))
    print(
        f"  plain DataLoader over PNG files: {rates['png_folder']:,.0f} images/s, "
        f"worker {worker_us['png_folder']:.1f} us/image",
        flush=True,
    )
    return rates, worker_us


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resolutions", default="64,128")
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in map(int, args.resolutions.split(",")):
            rates, worker_us = measure(Path(tmp), resolution, args.images, args.epochs)
            figures[f"{resolution}x{resolution}x3"] = {
                "raw_images_per_s": round(rates["raw"]),
                "png_images_per_s": round(rates["png"]),
                "png_folder_images_per_s": round(rates["png_folder"]),
                "raw_over_png": round(rates["raw"] / rates["png"], 2),
                "png_over_png_folder": round(rates["png"] / rates["png_folder"], 2),
                "worker_cpu_us_per_image": {side: round(us, 1) for side, us in worker_us.items()},
            }
    print(f"\n{'size':>10} {'raw img/s':>10} {'png img/s':>10} {'folder img/s':>12} {'raw/png':>8} {'png/folder':>10}")
    for size, f in figures.items():
        print(
            f"{size:>10} {f['raw_images_per_s']:>10,} {f['png_images_per_s']:>10,} "
            f"{f['png_folder_images_per_s']:>12,} {f['raw_over_png']:>8.2f} {f['png_over_png_folder']:>10.2f}"
        )
    print("worker CPU us/image:", {size: f["worker_cpu_us_per_image"] for size, f in figures.items()})
    print("goals: raw >= 30,000 images/s at 64x64x3 and >= 8x png; png >= 1.0x the PNG folder")
    headline = figures.get("64x64x3") or next(iter(figures.values()))
    report(
        "loader_throughput",
        figures,
        {"what": "torch DataLoader + Pillow over one PNG file per image, same worker count"},
        headline["raw_over_png"],
        ratio_is="raw / png through our loader at 64x64x3",
        images=args.images,
        epochs=args.epochs,
        batch=BATCH,
        workers=WORKERS,
    )


if __name__ == "__main__":
    main()

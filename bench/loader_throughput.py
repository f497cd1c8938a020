"""Loader images/s: our sharded loader vs a plain torch DataLoader over individual PNG files.

Both read the same 64x64 RGB PNG bytes (real MNIST digits, upscaled and colour-converted by
`pipeline prepare`), with 2 workers, batch 128, shuffled, delivering float NCHW in [-1, 1].
Each side runs one warm-up epoch (page cache, worker start), then `--epochs` timed epochs.

    python bench/loader_throughput.py [--images 10000] [--epochs 2]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from pipeline.config import DataConfig
from pipeline.data.loader import ShardedLoader
from pipeline.data.manifest import load_manifest, manifest_shards
from pipeline.data.prepare import Transform, prepare
from pipeline.data.shards import iter_samples

BATCH, WORKERS = 128, 2


class PngFiles(Dataset):
    """The usual baseline: one PNG file per image, decoded with PIL in the workers."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        array = np.asarray(Image.open(self.paths[i]).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)


def timed(iterate, epochs):
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in iterate():
            images += batch.shape[0]
    return images / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = prepare(
            "mnist", tmp / "shards", Transform(64, 3), samples_per_shard=1000, limit=args.images, progress=False
        )
        print(summary.line(), flush=True)
        files = tmp / "files"
        files.mkdir()
        paths = []
        for entry in manifest_shards(load_manifest(tmp / "shards"), "train"):
            for _, key, sample in iter_samples(entry.url):
                paths.append(files / f"{key}.png")
                paths[-1].write_bytes(sample["png"])
        ours = ShardedLoader(DataConfig(shards=str(tmp / "shards"), batch_per_rank=BATCH, workers=WORKERS), seed=0)
        plain = DataLoader(PngFiles(paths), batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True)
        ours_iter = lambda: (b.images for b in ours)  # noqa: E731
        plain_iter = lambda: iter(plain)  # noqa: E731
        timed(ours_iter, 1), timed(plain_iter, 1)  # warm-up
        ours_rate, plain_rate = timed(ours_iter, args.epochs), timed(plain_iter, args.epochs)
        print(f"sharded loader: {ours_rate:,.0f} images/s")
        print(f"plain DataLoader over PNG files: {plain_rate:,.0f} images/s")
        print(f"ratio: {ours_rate / plain_rate:.2f} (goal >= 1.0)")
        report(
            "loader_throughput",
            {"images_per_s": round(ours_rate, 1)},
            {"images_per_s": round(plain_rate, 1), "what": "torch DataLoader + PIL over one PNG file per image"},
            ours_rate / plain_rate,
            images=args.images,
            epochs=args.epochs,
            batch=BATCH,
            workers=WORKERS,
            resolution=64,
            channels=3,
        )


if __name__ == "__main__":
    main()

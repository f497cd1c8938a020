"""`prepare` throughput: images/s from JPEG photos-sized images to raw 64x64 RGB shards, with 1
and 2 worker processes, from a folder of JPEGs and from a foreign WebDataset shard set holding
the same JPEGs (KEY.jpg + KEY.json, as img2dataset writes them).

The images are real MNIST digits, upscaled to 256x256 RGB with a colour gradient under them
and saved as JPEG (quality 90): a decode and a 4x box downscale each, like a web-scraped set.
Each figure is the wall clock of one whole `prepare` call (listing the source, the pool, the
shards, their sha256, the manifest) over the images; the candidates run in interleaved
rounds, the median reported. The baseline is one worker from the folder; the ratio is two
workers' rate over it (the goal on this 2-core machine: at least 1.8).

    python bench/prepare_throughput.py [--images 6000] [--rounds 3]
"""

import argparse
import io
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import interleaved_rounds, report

from pipeline.data.prepare import Transform, prepare
from pipeline.data.sources import open_source


def jpeg_images(count: int) -> list[bytes]:
    digits = open_source("mnist").items[:count]
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    out = []
    for i, item in enumerate(digits):
        digit = np.asarray(Image.fromarray(item.payload).resize((256, 256), Image.Resampling.BILINEAR), np.float32)
        rgb = np.stack([digit, (digit + ramp[None, :]) / 2, (digit + ramp[:, None] * (i % 7) / 7) / 2], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_sources(images: list[bytes], root: Path, per_shard: int = 500) -> tuple[str, str]:
    folder = root / "jpegs"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:06d}.jpg").write_bytes(data)
    shards = root / "shards"
    shards.mkdir()
    for s in range(0, len(images), per_shard):
        with tarfile.open(shards / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                for ext, data in (("jpg", images[i]), ("json", b'{"status": "success"}')):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = (len(images) - 1) // per_shard
    return str(folder), str(shards / f"{{00000..{last:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    try:
        print(f"writing {args.images} JPEGs (256x256 RGB) as a folder and as shards ...", flush=True)
        folder, shard_set = write_sources(jpeg_images(args.images), root)
        transform = Transform(64, 3, image_format="raw")

        def rate(source: str, workers: int):
            def measure() -> float:
                out = root / "out"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                summary = prepare(source, out, transform, samples_per_shard=1000, workers=workers, progress=False)
                assert summary.count == args.images, summary.line()
                return args.images / (time.perf_counter() - started)

            return measure

        figures = interleaved_rounds(
            {
                "folder_1_worker": rate(folder, 1),
                "folder_2_workers": rate(folder, 2),
                "shards_1_worker": rate(shard_set, 1),
                "shards_2_workers": rate(shard_set, 2),
            },
            args.rounds,
            unit=" img/s",
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {name: round(statistics.median(values), 1) for name, values in figures.items()}
    print(", ".join(f"{name}: {value} img/s" for name, value in medians.items()))
    scaling = medians["folder_2_workers"] / medians["folder_1_worker"]
    shard_scaling = medians["shards_2_workers"] / medians["shards_1_worker"]
    print(f"2 workers / 1: folder {scaling:.2f}x, shard set {shard_scaling:.2f}x (goal: 1.8x)")
    report(
        "prepare_throughput",
        {**medians, "rounds": {k: [round(v, 1) for v in values] for k, values in figures.items()}},
        {"folder_1_worker": medians["folder_1_worker"]},
        scaling,
        ratio_is="folder, 2 workers / 1 worker (images/s)",
        shard_set_ratio=round(shard_scaling, 3),
        images=args.images,
        transform="JPEG 256x256 RGB -> raw 64x64 RGB",
    )


if __name__ == "__main__":
    main()

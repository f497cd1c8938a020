"""FID speed: generation + feature extraction + statistics + distance for n samples.

    python bench/fid_speed.py                 # CPU: 200 samples; GPU: 10,000 (goal <= 30 s on one H100)
    python bench/fid_speed.py --n 10000 --batch-size 500

Figures: images/s through the TF-FID Inception (5.7 GFLOPs per 299x299 image), the whole
FID's seconds, and the achieved GFLOP/s. Baseline, in the same process: the device's
measured fp32 matmul rate (TF32 off), so the ratio is the share of fp32 peak that FID reaches.
Also the cost of precision/recall/density/coverage on top (k = 5, the same n features on
each side) and of the Inception Score (10 splits; the 1008 x 2048 softmax layer with random
weights of the real one's shape: the real layer is a GitHub download, and its cost does not
depend on its values), in seconds and as a share of the FID's seconds (goal: under 10%).
"""

import argparse
import time

import torch
from harness import report

from pipeline.evaluation.fid import compare, generated_stats
from pipeline.evaluation.inception import InceptionFeatures
from pipeline.evaluation.stats import inception_score, precision_recall_density_coverage
from pipeline.models.dcgan import Generator

GFLOP_PER_IMAGE = 5.7


def matmul_gflops(device: torch.device, size: int, seconds: float = 3.0) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000 if cuda else 200)
    parser.add_argument("--batch-size", type=int, default=500 if cuda else 50)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    generator = Generator(32, 1, 100, 64).to(device)
    extractor = InceptionFeatures(device)
    generated_stats(extractor, generator, args.batch_size, args.batch_size, seed=1, progress=False)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    stats = generated_stats(extractor, generator, args.n, args.batch_size, seed=0, progress=True)
    result = compare(stats, stats, extractor, kid_subsets=100, kid_subset_size=1000, seed=0)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    prdc = precision_recall_density_coverage(stats.kid_features, stats.kid_features, 5, device=device)
    prdc_seconds = time.perf_counter() - started
    print(f"precision/recall/density/coverage of {args.n} vs {args.n}: {prdc_seconds:.2f} s ({prdc})")
    extractor.softmax_weights = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    started = time.perf_counter()
    score = inception_score(extractor.logits(stats.kid_features), 10)
    is_seconds = time.perf_counter() - started
    print(f"Inception Score of {args.n} (random softmax layer): {is_seconds:.3f} s ({score[0]:.3f} +- {score[1]:.3f})")
    rate = args.n / seconds
    peak = matmul_gflops(device, 8192 if cuda else 2048)
    achieved = rate * GFLOP_PER_IMAGE
    print(
        f"{args.n} samples: FID+KID in {seconds:.1f} s ({rate:.1f} images/s, {achieved:.0f} GFLOP/s); "
        f"fp32 matmul {peak:.0f} GFLOP/s; FID(X, X) = {result['fid']:.2e}"
    )
    report(
        "fid_speed",
        {
            "n": args.n,
            "seconds": round(seconds, 2),
            "images_per_s": round(rate, 2),
            "gflops": round(achieved, 1),
            "prdc_seconds": round(prdc_seconds, 3),
            "prdc_share_of_fid": round(prdc_seconds / seconds, 4),
            "is_seconds": round(is_seconds, 3),
            "new_metrics_share_of_fid": round((prdc_seconds + is_seconds) / seconds, 4),
        },
        {"fp32_matmul_gflops": round(peak, 1)},
        achieved / peak,
        device=device.type,
    )


if __name__ == "__main__":
    main()

"""The epoch plan at cluster scale, simulated: per-rank plan time and peak memory for world
sizes 8, 512 and 8192 and datasets of 10^6, 10^8 and 10^9 samples in shards of 10,000, at
an epoch's start and after an elastic re-plan from 8192 to 6000 ranks mid-epoch; then an
exact coverage check at a size it can enumerate (10^7 samples, 512 ranks, then 300).

A rank's plan is what `ShardedLoader` computes on every rank: the layout over the manifest's
shard counts, the rank's batches of the epoch (`EpochLayout.rank_batches`) and the epoch's
length (`remaining_count`). Each case times three ranks (first, middle, last) and reports the
slowest; peak memory is tracemalloc's peak during one rank's plan (NumPy reports its arrays
to it), the shard-count tuple included. The baseline is the whole-stream plan this one
replaced (tests/epoch_plan_reference.py), run on the coverage case: it holds 8 bytes a sample
on every rank, so at 10^9 it would need 8 GB per rank before its first batch.

    python bench/scale_plan.py [--batch 64] [--sizes 1e6,1e8,1e9] [--worlds 8,512,8192]
"""

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import report

from pipeline.data.epoch_plan import EpochLayout
from tests.epoch_plan_reference import reference_rank_batches, reference_remaining

SHARD = 10_000
SEED, EPOCH, WINDOW = 0, 3, 4096


def layout(counts: tuple, world: int, rank: int, batch: int, remainder: str = "drop") -> EpochLayout:
    return EpochLayout(counts, world, rank, batch, SEED, True, WINDOW, remainder)


def one_rank(counts: tuple, world: int, rank: int, batch: int, history: tuple) -> int:
    """One rank's plan, as the loader makes it; returns its batch count."""
    plan = layout(counts, world, rank, batch)
    plan.remaining_count(EPOCH, history)
    return len(plan.rank_batches(EPOCH, history))


def measure(counts: tuple, world: int, batch: int, history: tuple = ()) -> dict:
    """The slowest of three ranks' plan times, and the largest peak memory of one rank's plan."""
    seconds, peak, batches = 0.0, 0, 0
    for rank in sorted({0, world // 2, world - 1}):
        started = time.perf_counter()
        batches = one_rank(counts, world, rank, batch, history)
        seconds = max(seconds, time.perf_counter() - started)
        tracemalloc.start()
        one_rank(tuple(counts), world, rank, batch, history)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return {"plan_s": round(seconds, 4), "peak_mb": round(peak / 2**20, 2), "batches_per_rank": batches}


def coverage(samples: int, world: int, new_world: int, batch: int, remainder: str, plan) -> dict:
    """Every rank's samples of one epoch, `world` ranks then `new_world` from mid-epoch: each
    sample seen once, but the remainder rule's (dropped, or padded twice)."""
    counts = (SHARD,) * (samples // SHARD)
    consumed = layout(counts, world, 0, batch, remainder).batches_per_epoch // 2
    history = ((world, batch, consumed),)
    seen = np.zeros(samples, dtype=np.int64)
    started = time.perf_counter()
    for rank in range(world):
        before = plan(layout(counts, world, rank, batch, remainder), EPOCH, ())[:consumed]
        np.add.at(seen, before[..., 0].ravel() * SHARD + before[..., 1].ravel(), 1)
    for rank in range(new_world):
        after = plan(layout(counts, new_world, rank, batch, remainder), EPOCH, history)
        np.add.at(seen, after[..., 0].ravel() * SHARD + after[..., 1].ravel(), 1)
    seconds = time.perf_counter() - started
    left = samples - world * consumed * batch
    group = new_world * batch
    if remainder == "drop":
        expected = {0: left % group, 1: samples - left % group}
    else:
        expected = {1: samples - (-left % group), 2: -left % group}
    found = {int(k): int(v) for k, v in zip(*np.unique(seen, return_counts=True), strict=True)}
    expected = {k: v for k, v in expected.items() if v}
    assert found == expected, f"coverage {remainder}: seen-count histogram {found}, expected {expected}"
    return {"seconds": round(seconds, 2), "histogram": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", default="1e6,1e8,1e9")
    parser.add_argument("--worlds", default="8,512,8192")
    parser.add_argument("--elastic", default="8192,6000", help="world sizes before and after the re-plan")
    parser.add_argument("--coverage", default="1e7,512,300", help="samples, world before, world after")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    before, after = (int(w) for w in args.elastic.split(","))
    cases = len(sizes) * (len(worlds) + 1)
    started, figures, done = time.perf_counter(), {}, 0
    for samples in sizes:
        counts = (SHARD,) * (samples // SHARD)
        for world in worlds:
            figures[f"{samples:.0e} x {world}"] = measure(counts, world, args.batch)
            done += 1
            print(f"[{done}/{cases}] {samples:.0e} samples x {world} ranks: {figures[f'{samples:.0e} x {world}']}")
        full = layout(counts, before, 0, args.batch).batches_per_epoch
        key = f"{samples:.0e} x {before}->{after}"
        if full < 2:
            figures[key] = f"n/a: {full} batch per rank per epoch at {before} ranks, no mid-epoch"
        else:
            figures[key] = measure(counts, after, args.batch, ((before, args.batch, full // 2),))
        done += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (cases - done)
        print(f"[{done}/{cases}] elastic {key}: {figures[key]}  ({elapsed:.0f} s, ETA {eta:.0f} s)")

    samples, world, new_world = (int(float(v)) for v in args.coverage.split(","))
    checked = {}
    for remainder in ("drop", "pad"):
        checked[remainder] = coverage(samples, world, new_world, args.batch, remainder, EpochLayout.rank_batches)
        print(f"coverage {samples:.0e} samples, {world} -> {new_world} ranks, {remainder}: {checked[remainder]}")

    # The baseline: the whole-stream plan, one rank's elastic re-plan at the coverage size.
    counts = (SHARD,) * (samples // SHARD)
    history = ((world, args.batch, layout(counts, world, 0, args.batch).batches_per_epoch // 2),)
    ranks = {}
    for name, plan in (("whole_stream", reference_rank_batches), ("ours", EpochLayout.rank_batches)):
        rank_layout = layout(counts, new_world, new_world // 2, args.batch)
        started = time.perf_counter()
        plan(rank_layout, EPOCH, history)
        if name == "whole_stream":
            len(reference_remaining(rank_layout, EPOCH, history))
        seconds = time.perf_counter() - started
        tracemalloc.start()
        plan(rank_layout, EPOCH, history)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ranks[name] = {"plan_s": round(seconds, 4), "peak_mb": round(peak / 2**20, 2)}
    print(f"one rank's elastic re-plan at {samples:.0e} x {world}->{new_world}: {ranks}")
    biggest = max(sizes)
    worst = figures.get(f"{biggest:.0e} x {before}->{after}")
    goal = {"plan_s": 1.0, "peak_mb": 256}
    report(
        "scale_plan",
        {"per_rank": figures, "coverage": checked, "elastic_replan_at_coverage_size": ranks["ours"], "goal": goal},
        {"whole_stream_elastic_replan_at_coverage_size": ranks["whole_stream"]},
        ranks["whole_stream"]["peak_mb"] / max(ranks["ours"]["peak_mb"], 1e-9),
        ratio_is="whole-stream plan's peak memory / ours, one rank's elastic re-plan at the coverage size",
        meets_goal=isinstance(worst, dict) and worst["plan_s"] <= 1.0 and worst["peak_mb"] <= 256,
    )


if __name__ == "__main__":
    main()

"""The first epoch plan, kept as the reference the scalable one must equal sample for sample:
it lists the epoch's whole stream (8 bytes a sample, on every rank) and, after an elastic
change, re-derives every earlier rank's slice and masks the whole stream. Used by
tests/test_epoch_plan.py and, as its baseline, by bench/scale_plan.py."""

import math

import numpy as np

from pipeline.data.epoch_plan import EpochLayout


def reference_remaining(layout: EpochLayout, epoch: int, history) -> np.ndarray:
    left = np.arange(layout.total, dtype=np.int64)
    for index, (world, batch, consumed) in enumerate(history):
        taken = [reference_slice(layout, left, world, batch, r, epoch, index)[: consumed * batch] for r in range(world)]
        keep = np.ones(layout.total, dtype=bool)
        keep[np.concatenate(taken)] = False
        left = left[keep[left]]
    return left


def reference_slice(layout, left, world, batch, rank, epoch, segment) -> np.ndarray:
    per_rank = layout.batch_count(len(left), world, batch) * batch
    positions = left[np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64) % max(len(left), 1)]
    if layout.shuffle:
        window = math.ceil(layout.shuffle_window / batch) * batch
        key = [layout.seed, epoch, rank] if segment == 0 else [layout.seed, epoch, segment, rank]
        for w, start in enumerate(range(0, per_rank, window)):
            window_rng = np.random.default_rng([*key, w])
            positions[start : start + window] = window_rng.permutation(positions[start : start + window])
    return positions


def reference_rank_batches(layout: EpochLayout, epoch: int, history) -> np.ndarray:
    counts = np.asarray(layout.counts, dtype=np.int64)
    rng = np.random.default_rng([layout.seed, epoch])
    shard_order = rng.permutation(len(counts)) if layout.shuffle else np.arange(len(counts))
    ends = np.cumsum(counts[shard_order])
    left = reference_remaining(layout, epoch, history)
    positions = reference_slice(
        layout, left, layout.world_size, layout.batch_per_rank, layout.rank, epoch, len(history)
    )
    slot = np.searchsorted(ends, positions, side="right")
    first = ends[slot] - counts[shard_order][slot]
    return np.stack([shard_order[slot], positions - first], axis=-1).reshape(-1, layout.batch_per_rank, 2)

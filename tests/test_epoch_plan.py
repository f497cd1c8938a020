"""The epoch plan against its reference (tests/epoch_plan_reference.py, the first version of
the plan, which listed the epoch's whole stream): the same batches, sample for sample, on every
rank, for every history of elastic segments."""

import numpy as np
import pytest

from pipeline.data.epoch_plan import EpochLayout
from tests.epoch_plan_reference import reference_rank_batches, reference_remaining


def random_case(rng: np.random.Generator):
    """A layout and a history of up to three earlier segments, drawn to reach the edge cases:
    tiny datasets (smaller than one global batch, with pad), windows astride slice ends, shards
    of one sample, no shuffle."""
    counts = tuple(int(c) for c in rng.integers(1, 60, size=rng.integers(1, 12)))
    total = sum(counts)
    remainder = str(rng.choice(["drop", "pad"]))
    layout = dict(
        counts=counts,
        seed=int(rng.integers(0, 1000)),
        shuffle=bool(rng.random() < 0.8),
        shuffle_window=int(rng.integers(1, 40)),
        epoch_remainder=remainder,
    )
    history, left = [], total
    for _ in range(rng.integers(0, 4)):
        world, batch = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        probe = EpochLayout(world_size=world, rank=0, batch_per_rank=batch, **layout)
        batches = probe.batch_count(left, world, batch)
        if batches < 2:
            break
        consumed = int(rng.integers(1, batches))
        history.append((world, batch, consumed))
        left = probe.remaining_count(0, tuple(history))
    world, batch = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    if EpochLayout(world_size=world, rank=0, batch_per_rank=batch, **layout).batch_count(left, world, batch) == 0:
        remainder = layout["epoch_remainder"] = "pad"
    return layout, world, batch, tuple(history)


@pytest.mark.parametrize("seed", range(8))
def test_the_plan_equals_its_whole_stream_reference_on_every_rank(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        fields, world, batch, history = random_case(rng)
        epoch = int(rng.integers(0, 3))
        for rank in range(world):
            layout = EpochLayout(world_size=world, rank=rank, batch_per_rank=batch, **fields)
            assert layout.remaining_count(epoch, history) == len(reference_remaining(layout, epoch, history))
            expected = reference_rank_batches(layout, epoch, history)
            np.testing.assert_array_equal(layout.rank_batches(epoch, history), expected, err_msg=str((fields, history)))


def test_a_large_elastic_plan_lists_only_this_ranks_share():
    """10^8 samples, 512 ranks then 300: the whole-stream plan would hold 800 MB per rank; this
    one holds this rank's share (the reference cannot run here; the small cases above pin the
    order, and bench/scale_plan.py checks coverage at 10^7)."""
    counts = (10_000,) * 10_000
    history = ((512, 64, 1000),)
    layout = EpochLayout(counts, 300, 7, 64, 0, True, 4096, "drop")
    batches = layout.rank_batches(3, history)
    left = 10**8 - 512 * 64 * 1000
    assert layout.remaining_count(3, history) == left
    assert batches.shape == (left // (300 * 64), 64, 2)
    assert len(np.unique(batches[..., 0] * 10_000 + batches[..., 1])) == batches.shape[0] * 64

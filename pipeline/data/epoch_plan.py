"""The epoch plan: which samples each rank reads in an epoch, and in which order.

Which ranks run it: every rank, alone. The plan is a pure function of (shard counts, seed,
epoch, world size, batch, the epoch's earlier segments), so ranks agree without talking.
What it computes is described once, in docs/data.md, "The loader: how an epoch is laid out".

How it scales: a rank never lists the epoch's whole stream. The stream of an epoch is the
positions 0..N-1; a rank's slice of it is a range of indices, mapped to positions. After an
elastic change, what an earlier segment left of the stream is described piecewise, one to
three pieces per earlier rank (the untouched tail of its slice, the unconsumed rest of its
half-read shuffle window, which is listed only when this rank's slice reaches it), so a
rank's time and memory grow with the shard count, the earlier world sizes and its own
share of samples, never with N (bench/scale_plan.py measures it up to 8192 ranks and 10^9
samples). The order is the one the first version of this plan listed with whole-stream
arrays, sample for sample; tests/test_epoch_plan.py holds that version as its reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# An earlier part of the current epoch, run with another world size or batch:
# (world_size, batch_per_rank, batches each rank consumed). See EpochLayout.
Segment = tuple[int, int, int]


class _WholeStream:
    """An epoch's stream, untouched: index i is stream position i."""

    def __init__(self, size: int):
        self.size = size

    def take(self, indices: np.ndarray) -> np.ndarray:
        return indices


class _Remainder:
    """The indices of a parent stream that one segment did not consume, in the parent's order.

    Pieces, in parent order: a range of parent indices, taken whole (`lo`, `count`), or a
    short sorted list of them (an unconsumed rest of a half-read shuffle window, or the stretch
    where a padded segment wrapped around); a window's list is made only when asked for."""

    def __init__(self, parent, pieces: list[tuple[int, int, object]]):
        self.parent = parent
        self.lo = np.array([lo for lo, _, _ in pieces], dtype=np.int64)
        counts = np.array([count for _, count, _ in pieces], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.size = int(self.starts[-1])
        self.listed = np.array([listing is not None for _, _, listing in pieces], dtype=bool)
        self._listings = {p: listing for p, (_, _, listing) in enumerate(pieces) if listing is not None}

    def take(self, indices: np.ndarray) -> np.ndarray:
        piece = np.searchsorted(self.starts, indices, side="right") - 1
        offset = indices - self.starts[piece]
        parent_indices = self.lo[piece] + offset
        for p in np.unique(piece[self.listed[piece]]).tolist():
            hit = piece == p
            parent_indices[hit] = self._listing(p)[offset[hit]]
        return self.parent.take(parent_indices)

    def _listing(self, p: int) -> np.ndarray:
        listing = self._listings[p]
        if callable(listing):
            listing = self._listings[p] = listing()
        return listing


@dataclass(frozen=True)
class EpochLayout:
    """The plan's inputs that every rank shares.

    Segments (elastic resume): a run resumed on another world size or batch continues the
    epoch it stopped in. The samples each earlier segment's ranks consumed are known from
    (world_size, batch_per_rank, batches) alone, as every plan here is a pure function; the
    samples of the stream that remain, in stream order, are planned again with this layout,
    the remainder rule applied to them. So nothing consumed is seen again this epoch and
    everything else is seen once (or dropped/padded by the rule, as in any epoch)."""

    counts: tuple[int, ...]  # samples per shard, in manifest / URL order
    world_size: int
    rank: int
    batch_per_rank: int
    seed: int
    shuffle: bool
    shuffle_window: int
    epoch_remainder: str

    @property
    def total(self) -> int:
        return sum(self.counts)

    def batch_count(self, samples: int, world_size: int | None = None, batch_per_rank: int | None = None) -> int:
        """Batches per rank for `samples` samples (this layout's world and batch by default)."""
        group = (world_size or self.world_size) * (batch_per_rank or self.batch_per_rank)
        rounding = math.ceil if self.epoch_remainder == "pad" else math.floor
        return int(rounding(samples / group))

    @property
    def batches_per_epoch(self) -> int:
        return self.batch_count(self.total)

    def remaining_count(self, epoch: int, history: tuple[Segment, ...]) -> int:
        """How many samples of `epoch` the segments in `history` did not consume."""
        return self._stream(epoch, history).size

    def rank_batches(self, epoch: int, history: tuple[Segment, ...] = ()) -> np.ndarray:
        """(batches, batch_per_rank, 2) array of (shard index, sample index in shard): this rank's
        batches of `epoch` after the segments in `history`."""
        counts = np.asarray(self.counts, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(counts)) if self.shuffle else np.arange(len(counts))
        ends = np.cumsum(counts[shard_order])  # stream position where each (ordered) shard ends
        stream = self._stream(epoch, history)
        positions = self._slice(stream, self.world_size, self.batch_per_rank, self.rank, epoch, len(history))
        slot = np.searchsorted(ends, positions, side="right")
        first = ends[slot] - counts[shard_order][slot]
        return np.stack([shard_order[slot], positions - first], axis=-1).reshape(-1, self.batch_per_rank, 2)

    def _window(self, batch: int) -> int:
        """Samples shuffled together: the shuffle window rounded up to whole batches."""
        return math.ceil(self.shuffle_window / batch) * batch

    def _window_order(self, epoch: int, segment: int, rank: int, window: int, length: int) -> np.ndarray:
        # Segment 0 keeps the seeds of a run that never changed size (bit-exact resumes).
        key = [self.seed, epoch, rank] if segment == 0 else [self.seed, epoch, segment, rank]
        return np.random.default_rng([*key, window]).permutation(length)

    def _slice(self, stream, world: int, batch: int, rank: int, epoch: int, segment: int) -> np.ndarray:
        """Rank `rank`'s stream positions in one segment, in delivery order: its contiguous
        slice of `stream`, shuffled within windows."""
        per_rank = self.batch_count(stream.size, world, batch) * batch
        indices = (rank * per_rank + np.arange(per_rank, dtype=np.int64)) % max(stream.size, 1)
        positions = stream.take(indices)
        if self.shuffle:
            window = self._window(batch)
            for w, start in enumerate(range(0, per_rank, window)):
                chunk = positions[start : start + window]
                positions[start : start + window] = chunk[self._window_order(epoch, segment, rank, w, len(chunk))]
        return positions

    def _stream(self, epoch: int, history: tuple[Segment, ...]):
        """What the segments in `history` left of `epoch`'s stream."""
        stream = _WholeStream(self.total)
        for segment, (world, batch, consumed) in enumerate(history):
            stream = self._remainder(stream, world, batch, consumed, epoch, segment)
        return stream

    def _remainder(self, parent, world: int, batch: int, consumed: int, epoch: int, segment: int):
        """The indices of `parent` that a segment of `world` ranks, each having consumed
        `consumed` batches of `batch`, left unread.

        Rank r's slice covers the indices r*P .. r*P+P-1 (P samples per rank), taken modulo the
        parent's size n: with `pad` the last slices wrap around to the parent's start. Rank r
        consumed the first `taken` samples of its slice in its shuffled order: its first whole
        windows, and `taken` mod window samples of the next (the first of that window's
        permutation). Below z (where wrapped slices land, if any) several ranks may have
        consumed the same index, so that stretch is listed whole; above it each index belongs
        to one rank's slice at most."""
        n = parent.size
        per_rank = self.batch_count(n, world, batch) * batch
        taken = consumed * batch
        if taken == 0 or n == 0:
            return parent
        window = self._window(batch) if self.shuffle else per_rank
        whole = taken // window * window if self.shuffle else taken  # consumed whole windows
        partial = taken - whole  # consumed samples of the next window

        def window_taken(rank: int) -> tuple[int, int, Callable[[], np.ndarray]]:
            """Rank's half-read window: its first index (unwrapped), its length, and a function
            giving the offsets in it that the rank consumed (the first of its permutation)."""
            first, length = rank * per_rank + whole, min(window, per_rank - whole)
            return first, length, lambda: self._window_order(epoch, segment, rank, whole // window, length)[:partial]

        span = world * per_rank
        z = min(n, max(0, span - n))
        pieces: list[tuple[int, int, object]] = []
        if z:  # every rank whose slice reaches below z or wraps past n
            free = np.ones(z, dtype=bool)
            for rank in sorted({*range(min(world, math.ceil(z / per_rank))), *range(n // per_rank, world)}):
                start = rank * per_rank
                for lap in range(start // n, (start + whole - 1) // n + 1) if whole else ():
                    lo, hi = max(start, lap * n) - lap * n, min(start + whole, lap * n + n) - lap * n
                    free[lo : min(hi, z)] = False
                if partial:
                    first, _, offsets = window_taken(rank)
                    points = (first + offsets()) % n
                    free[points[points < z]] = False
            listed = np.flatnonzero(free).astype(np.int64)
            pieces.append((0, len(listed), listed))
        for rank in range(z // per_rank, min(world, math.ceil(n / per_rank))):
            start, end = rank * per_rank, min((rank + 1) * per_rank, n)
            rest = start + whole  # the first index this rank did not consume whole
            if partial:
                first, length, offsets = window_taken(rank)
                if z <= first and first + length <= n:
                    pieces.append((first, length - partial, _unconsumed(first, length, offsets)))
                else:  # a window astride z (or n): list its part in [z, n) now
                    unread = np.delete(np.arange(first, first + length, dtype=np.int64), offsets())
                    unread = unread[(unread >= z) & (unread < n)]
                    pieces.append((first, len(unread), unread))
                rest = first + length
            lo, hi = max(rest, z), end
            if lo < hi:
                pieces.append((lo, hi - lo, None))
        if max(span, z) < n:  # not in any slice (`drop`'s remainder): untouched
            pieces.append((max(span, z), n - max(span, z), None))
        return _Remainder(parent, pieces)


def _unconsumed(first: int, length: int, offsets):
    """The sorted indices of a half-read window that its rank did not consume, made when asked
    (its permutation too: made for every earlier rank, they would cost O(world x window))."""

    def listing() -> np.ndarray:
        return np.delete(np.arange(first, first + length, dtype=np.int64), offsets())

    return listing

"""The distributed, resumable shard loader.

Which ranks run it: every rank builds its own `ShardedLoader(rank, world_size)`; the
epoch's plan is a pure function of (shard counts, seed, epoch, world size, batch), so
ranks agree without talking to each other.

How an epoch is laid out, how a resume continues it (on any world size), and what a bad
sample becomes: docs/data.md, "The loader: how an epoch is laid out" (the one description;
`EpochLayout` in epoch_plan.py computes it).

How a batch travels from a worker: each worker builds its batches in a small ring of
shared-memory buffers, sent to the rank once; a batch then travels as its slot number, and
the rank copies it out and frees the slot. A new shared-memory tensor per batch (what
default_collate does) cost the worker an allocation, page faults and a file-descriptor
hand-over on every batch: 1.7 ms of its time per 128 images at 64x64 RGB, against 0.1 ms.
Raw images of indexed shards skip the per-sample bytes, member dict and decode: each is a
view of its mapped shard, copied once, into the slot (worker CPU per 64x64 RGB image
15-16 us -> 6-8 us, the rest being the batch's Python bookkeeping).
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import math
import signal
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.decode import BadSample, decode_sample
from pipeline.data.epoch_plan import EpochLayout, Segment
from pipeline.data.manifest import ShardEntry
from pipeline.data.shards import IndexedShard, StaleIndex, iter_samples, open_indexed, resolve_shards, verify_shards
from pipeline.errors import UserError

log = logging.getLogger("pipeline.data")

# The DataLoader iterators whose workers are running (any process, main thread).
_running: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_running_workers() -> None:
    """At interpreter exit, stop the workers of every loader still being iterated (say, a
    script's module-level `loader.forever()`). Otherwise multiprocessing's own exit handler
    (registered earlier, so run later) sends the daemonic workers SIGTERM, which ours ignore
    (_worker_init), and joins them without a bound: the script never exits. DataLoader's
    `_shutdown_workers` is what its own `__del__` runs."""
    for batches in list(_running):
        batches._shutdown_workers()


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 N x H x W x C as stored (pinned with CUDA); the trainer scales on the device
    labels: torch.Tensor | None  # int64 N, when the shards carry .cls
    keys: list[str]  # sample keys as delivered (a replaced corrupt sample shows its replacement's key)
    n_corrupt: int  # samples of this batch that were corrupt or missing and got replaced


class _Delivery(NamedTuple):
    """A worker's batch on its way to the rank: its images stay in the worker's ring of
    shared-memory buffers (sent along with the worker's first batch only)."""

    worker: int
    slot: int
    ring: torch.Tensor | None  # uint8 slots x N x H x W x C, in the worker's first delivery only
    labels: list | None
    keys: list[str]
    n_corrupt: int


class _StreamDataset(IterableDataset):
    """One rank's batches from (epoch, start_batch) on, for `epochs` epochs or without end.
    Runs in DataLoader workers (or in the main process when workers == 0); yields uint8
    batches, decoded in the worker.

    Worker w of W builds the w-th, (w+W)-th, ... batch of this stream, counted across epoch
    boundaries, so the DataLoader's round-robin returns them in order and one set of workers
    serves a whole run: no worker restart, and no idle device, at each epoch's start."""

    def __init__(
        self,
        entries: list[ShardEntry],
        layout: EpochLayout,
        epoch: int,
        history,
        start_batch: int,
        epochs: int | None,
        shape,
        free_slots: list,
        ring_slots: int,
        timeout_s: float,
    ):
        self.entries, self.urls, self.layout, self.shape = entries, [e.url for e in entries], layout, shape
        self.epoch, self.history, self.start_batch, self.epochs = epoch, history, start_batch, epochs
        # Per worker, a semaphore counting its ring's free slots (None without workers): the
        # worker takes one before filling a slot, the rank gives it back once it has copied
        # the batch out. DataLoader's prefetch bound keeps fewer batches in flight than there
        # are slots, so the wait is a safeguard that normally returns at once.
        self.free_slots, self.ring_slots, self.timeout_s = free_slots, ring_slots, timeout_s
        self.ring, self.delivered = None, 0
        self.indexed: dict[int, IndexedShard | None] = {}  # per shard, see _cursor

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, first, stream_index = self.epoch, self.start_batch, 0  # stream_index: of batch `first`
        while self.epochs is None or epoch < self.epoch + self.epochs:
            plan = self.layout.rank_batches(epoch, self.history if epoch == self.epoch else ())
            batch_ids = list(range(first, len(plan)))
            yield from self._epoch(epoch, plan, batch_ids[(worker - stream_index) % n_workers :: n_workers])
            epoch, first, stream_index = epoch + 1, 0, stream_index + len(batch_ids)

    def _epoch(self, epoch: int, plan: np.ndarray, batch_ids: list[int]) -> Iterator[Batch]:
        """This worker's batches `batch_ids` of one epoch's plan."""
        if not batch_ids:
            return
        layout = self.layout
        wanted: dict[int, set[int]] = {}
        for shard, index in plan[batch_ids].reshape(-1, 2).tolist():
            wanted.setdefault(shard, set()).add(index)
        cursors: dict[int, _ShardCursor] = {}
        self._plan, self._fallback, self._fallback_epoch = plan, None, epoch
        window_batches = math.ceil(layout.shuffle_window / layout.batch_per_rank) if layout.shuffle else 1
        for _, group in itertools.groupby(batch_ids, key=lambda b: b // window_batches):
            group = list(group)
            shards = np.unique(plan[group][..., 0]).tolist()
            for shard in shards:
                if shard not in cursors:
                    cursors[shard] = self._cursor(shard, wanted[shard])
            if self.shape is not None and all(cursors[shard].raw_indexed for shard in shards):
                # Raw images through the shards' indexes: each sample is a view of its mapped
                # shard, copied once, into the batch buffer.
                for b in group:
                    yield self._assemble([self._raw_sample(cursors[shard], index) for shard, index in plan[b].tolist()])
                continue
            # Samples inside a window are shuffled, but a walked shard is read forward: read a
            # window's worth of this worker's samples in shard order first, then assemble its batches.
            needed = sorted({tuple(p) for b in group for p in plan[b].tolist()})
            read = {}
            for shard, index in needed:
                if index < cursors[shard].next_index:  # `pad` wrapped the stream around
                    cursors[shard] = self._cursor(shard, wanted[shard])
                read[shard, index] = cursors[shard].read(index)
            for b in group:
                yield self._assemble([self._decoded(*read[tuple(p)], self.urls[p[0]]) for p in plan[b].tolist()])

    def _cursor(self, shard: int, wanted: set[int]) -> _ShardCursor:
        """A reader of `wanted` samples of a shard. Its index and mapping are opened once per
        stream (the first epoch's page faults are not paid again in later ones)."""
        if shard not in self.indexed:
            self.indexed[shard] = open_indexed(self.entries[shard])
        cursor = _ShardCursor(self.entries[shard], wanted, self.indexed[shard])
        self.indexed[shard] = cursor.indexed  # None once found stale: walked from then on
        return cursor

    def _decoded(self, key: str, files: dict | BadSample, url: str) -> tuple | None:
        """(image, class, key) of a read sample; None for a corrupt or missing one (logged)."""
        try:
            if isinstance(files, BadSample):  # missing from a truncated shard
                raise files
            image, label = decode_sample(files, self.shape)
        except BadSample as exc:  # a corrupt sample is a counted skip, never a crash
            log.warning("skipping corrupt sample %s of %s: %s", key, url, exc)
            return None
        self.shape = self.shape or image.shape
        return image, label, key

    def _raw_sample(self, cursor: _ShardCursor, index: int) -> tuple | None:
        """As _decoded, for a sample of a raw indexed shard."""
        key, offsets, sizes = cursor.located[index]
        try:
            image, label = cursor.indexed.raw_sample(offsets, sizes, self.shape)
        except BadSample as exc:
            log.warning("skipping corrupt sample %s of %s: %s", key, cursor.url, exc)
            return None
        return image, label, key

    def _assemble(self, samples: list[tuple | None]) -> Batch | _Delivery:
        """One batch from its decoded samples; a corrupt or missing one (None) is replaced by the
        batch's first good sample."""
        n_bad = sum(sample is None for sample in samples)
        if n_bad:
            good = [s for s in samples if s is not None]
            replacement = good[0] if good else self._first_good_sample()
            samples = [s if s is not None else replacement for s in samples]
        images, labels, keys = zip(*samples, strict=True)
        # Labels travel as a list; the rank makes the tensor (_stream).
        labels = list(labels) if labels[0] is not None else None
        keys = list(keys)
        worker = get_worker_info()
        if worker is None:  # no workers: built in the rank's own process
            batch = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
            _stack(images, batch)
            return Batch(batch, labels, keys, n_bad)
        if not self.free_slots[worker.id].acquire(timeout=self.timeout_s):
            raise RuntimeError(f"loader worker {worker.id}: the rank freed no batch buffer in {self.timeout_s} s")
        first = self.ring is None
        if first:
            shape = (self.ring_slots, len(images), *images[0].shape)
            self.ring = torch.empty(shape, dtype=torch.uint8).share_memory_()
        slot = self.delivered % len(self.ring)
        _stack(images, self.ring[slot])
        self.delivered += 1
        return _Delivery(worker.id, slot, self.ring if first else None, labels, keys, n_bad)

    def _first_good_sample(self) -> tuple:
        """For a batch with no good sample at all (say, inside a truncated shard): the rank's first
        decodable sample of the epoch, so the choice does not depend on the worker count."""
        if self._fallback is None:
            cursors: dict[int, _ShardCursor] = {}
            for shard, index in self._plan.reshape(-1, 2).tolist():
                if shard not in cursors or index < cursors[shard].next_index:
                    cursors[shard] = self._cursor(shard, set(self._plan[..., 1][self._plan[..., 0] == shard].tolist()))
                key, files = cursors[shard].read(index)
                try:
                    if not isinstance(files, BadSample):
                        self._fallback = (*decode_sample(files, self.shape), key)
                        break
                except BadSample:
                    continue
            else:
                raise UserError(
                    f"no decodable sample in epoch {self._fallback_epoch} of this rank's shards ({self.urls[0]} ...)"
                )
        return self._fallback


def _stack(images: tuple[np.ndarray, ...], out: torch.Tensor) -> None:
    """Copy equal-shaped H x W x C images into `out` (N x H x W x C): one concatenation along H,
    without np.stack's new view of every image."""
    np.concatenate(images, axis=0, out=out.numpy().reshape(-1, *out.shape[2:]))


class _ShardCursor:
    """Reader of one shard's wanted samples: through the shard's index when it has a usable one
    (any order), else forward-only by walking its tar headers."""

    def __init__(self, entry: ShardEntry, wanted: set[int], indexed: IndexedShard | None):
        self.url, self.indexed = entry.url, indexed
        if self.indexed is not None:
            try:
                self.located = self.indexed.locate(sorted(wanted))
            except StaleIndex as exc:
                log.warning("shard %s changed since its index was written (%s); walking its tar headers", self.url, exc)
                self.indexed = None
        if self.indexed is None:
            self.samples = iter_samples(entry.url, wanted.__contains__)
        self.next_index = 0  # of the walk: an index below it needs a new cursor
        self.exhausted = False

    @property
    def raw_indexed(self) -> bool:
        """Whether raw images are read through the index (see IndexedShard.raw_sample)."""
        return self.indexed is not None and self.indexed.raw_column is not None

    def read(self, index: int) -> tuple[str, dict | BadSample]:
        if self.indexed is not None:
            key, offsets, sizes = self.located[index]
            return key, self.indexed.read(offsets, sizes)
        if not self.exhausted:
            for sample_index, key, files in self.samples:
                self.next_index = sample_index + 1
                if sample_index == index:
                    return key, files
            self.exhausted = True
        return f"#{index}", BadSample("sample missing: the shard ends early (truncated?)")


def _keep(batch):
    return batch


def _worker_init(worker_id: int) -> None:
    """Workers leave signals to their rank: a scheduler's SIGTERM/SIGUSR1 to the whole process
    tree must make the rank checkpoint, not kill its workers mid-batch. They stop when the
    rank shuts the DataLoader down (or, if the rank dies, by DataLoader's own watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # A worker is forked from a rank that has imported torch, DeepSpeed and MLflow; the cyclic
    # GC kept rescanning those inherited objects while the worker built batches (raw loader
    # 17.1k -> 18.4k images/s per worker with them imported). Freezing them stops that (and the
    # copy-on-write faults it causes); see the gc.freeze() docs.
    gc.freeze()


def _as_ours(exc: UserError) -> UserError:
    """A UserError raised in a DataLoader worker, as the worker raised it: torch re-raises it in
    this process with its own banner and the worker's traceback as the message ("Caught
    UserError in DataLoader worker process 0. Original Traceback ..."), which the CLI would
    print whole. Our message is the traceback's last line."""
    text = str(exc)
    if "in DataLoader worker process" not in text:
        return exc
    return type(exc)(text.rstrip().rsplit(f"{type(exc).__name__}: ", 1)[-1])


class ShardedLoader:
    """Yields `Batch`es for this rank; iterate it once per epoch (or use `forever()`)."""

    def __init__(self, config: DataConfig, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.config = config
        entries, self.manifest = resolve_shards(config.shards, config.split, config.allow_pipe)
        if config.verify:
            verify_shards(entries)
        self.entries, self.urls = entries, [e.url for e in entries]
        self.layout = EpochLayout(
            tuple(e.count for e in entries),
            world_size,
            rank,
            config.batch_per_rank,
            seed,
            config.shuffle,
            config.shuffle_window,
            config.epoch_remainder,
        )
        if self.layout.total == 0:
            raise UserError(f"{config.shards}: the shards hold no samples")
        if self.layout.batches_per_epoch == 0:
            raise UserError(
                f"{config.shards}: {self.layout.total} samples cannot fill one batch on every rank "
                f"(world_size {world_size} x batch_per_rank {config.batch_per_rank}); "
                "lower data.batch_per_rank or set data.epoch_remainder: pad"
            )
        self.shape = None
        if self.manifest is not None:
            self.shape = (self.manifest["resolution"], self.manifest["resolution"], self.manifest["channels"])
        self.corrupt_samples = 0
        self._start_epoch(0)

    def _start_epoch(self, epoch: int, history: tuple[Segment, ...] = (), consumed: int = 0) -> None:
        """Stand at batch `consumed` of `epoch`, after the earlier segments `history`."""
        self.epoch, self.history, self.batches_consumed = epoch, history, consumed
        self._length = self.layout.batch_count(self.layout.remaining_count(epoch, history)) if history else None
        if consumed == len(self):  # the epoch is used up (or its segment has no whole batch left)
            self._start_epoch(epoch + 1)

    def __len__(self) -> int:
        """Batches of the current epoch (fewer than usual in an epoch resumed on another world size)."""
        return self.layout.batches_per_epoch if self._length is None else self._length

    def state_dict(self) -> dict:
        """The data position: (epoch, batches consumed) under this world size and batch, after
        the earlier segments of the epoch (`history`, see EpochLayout)."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "world_size": self.layout.world_size,
            "batch_per_rank": self.layout.batch_per_rank,
            "history": [list(segment) for segment in self.history],
            "corrupt_samples": self.corrupt_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """A state saved under any world size and batch: the same ones continue exactly where they
        stopped; others close the saved segment and plan the rest of its epoch anew."""
        layout = self.layout
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        history = tuple(tuple(int(v) for v in segment) for segment in state.get("history", ()))
        saved = (
            int(state.get("world_size", layout.world_size)),
            int(state.get("batch_per_rank", layout.batch_per_rank)),
        )
        saved_length = layout.batch_count(layout.remaining_count(epoch, history), *saved)
        if not 0 <= consumed <= saved_length:
            raise UserError(f"loader state: {consumed} batches consumed of a {saved_length}-batch epoch")
        if saved != (layout.world_size, layout.batch_per_rank) and 0 < consumed < saved_length:
            history, consumed = (*history, (*saved, consumed)), 0
        elif consumed == saved_length:  # at the epoch's very end (saved by an older version)
            epoch, history, consumed = epoch + 1, (), 0
        # After a resize every rank loads rank 0's state: its count of corrupt samples stays rank 0's.
        resized = saved[0] != layout.world_size
        self.corrupt_samples = 0 if resized and layout.rank != 0 else int(state.get("corrupt_samples", 0))
        self._start_epoch(epoch, history, consumed)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the loader stands at the next epoch's start."""
        return self._stream(epochs=1)

    def forever(self) -> Iterator[Batch]:
        """Batch after batch across epochs, from one set of workers (they start once)."""
        return self._stream(epochs=None)

    def _stream(self, epochs: int | None) -> Iterator[Batch]:
        """Which process runs it: the rank's own (its workers run _StreamDataset)."""
        workers, prefetch = self.config.workers, self.config.prefetch_batches
        # In flight per worker: at most `prefetch` batches (DataLoader's bound) plus the one
        # being copied out here; one slot more is slack.
        ring_slots = prefetch + 2
        free_slots = [torch.multiprocessing.Semaphore(ring_slots) for _ in range(workers)]
        dataset = _StreamDataset(
            self.entries,
            self.layout,
            self.epoch,
            self.history,
            self.batches_consumed,
            epochs,
            self.shape,
            free_slots,
            ring_slots,
            self.config.timeout_s,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_keep,
            num_workers=workers,
            prefetch_factor=prefetch if workers else None,
            timeout=self.config.timeout_s if workers else 0,  # a stuck worker is an error, not a hang
            worker_init_fn=_worker_init,
        )
        pin = torch.cuda.is_available()  # for copies to the device with non_blocking=True
        rings: dict[int, torch.Tensor] = {}
        batches = iter(loader)
        if workers:
            _running.add(batches)
        try:
            for batch in batches:
                if isinstance(batch, _Delivery):
                    if batch.ring is not None:
                        rings[batch.worker] = batch.ring
                    ring_slot = rings[batch.worker][batch.slot]
                    images = torch.empty(ring_slot.shape, dtype=torch.uint8, pin_memory=pin)
                    # numpy's copy: torch's runs on all intra-op threads, slow on a busy node
                    np.copyto(images.numpy(), ring_slot.numpy())
                    free_slots[batch.worker].release()
                    batch = Batch(images, batch.labels, batch.keys, batch.n_corrupt)
                elif pin:
                    batch = batch._replace(images=batch.images.pin_memory())
                if batch.labels is not None:
                    batch = batch._replace(labels=torch.tensor(batch.labels))
                self.batches_consumed += 1
                self.corrupt_samples += batch.n_corrupt
                if self.batches_consumed == len(self):
                    self._start_epoch(self.epoch + 1)
                yield batch
        except UserError as exc:  # from a worker, or from our own reading in this process
            raise _as_ours(exc) from None
        finally:
            # Stop the workers here on every exit path, including an exception or close() of the
            # caller's generator: at interpreter exit DataLoader skips its own shutdown and
            # multiprocessing joins daemonic workers without a bound, and ours ignore SIGTERM
            # (_worker_init). A rank whose peer died then sat in that join until the launcher's
            # SIGKILL 30 s later. Dropping the last reference runs the iterator's shutdown now.
            del batches

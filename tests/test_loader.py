"""The distributed loader: equal batches on every rank, determinism, exact resume, bad data.

Each rank's loader is built here as rank r of world size W in one process: the
loader never communicates (its plan is a pure function of the config), so this is
exactly what each rank runs. test_loader_distributed.py runs it on real gloo ranks.
"""

import functools
import http.server
import io
import json
import logging
import math
import subprocess
import sys
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.loader import ShardedLoader
from pipeline.data.manifest import index_table, load_manifest
from pipeline.errors import UserError

N_SAMPLES = 103  # the small_shards fixture: 11 shards of 10, 10, ..., 3


def loader_for(shards, rank=0, world=1, seed=0, **overrides):
    config = DataConfig(**({"shards": str(shards), "batch_per_rank": 4, "workers": 0, "shuffle_window": 8} | overrides))
    return ShardedLoader(config, seed, rank, world)


def epoch_keys(loader):
    return [batch.keys for batch in loader]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_rank_gets_the_same_batch_count(small_shards, world, workers, remainder):
    shards, _, _ = small_shards
    per_rank = [
        epoch_keys(loader_for(shards, r, world, workers=workers, epoch_remainder=remainder)) for r in range(world)
    ]
    group = world * 4
    expected = (math.ceil if remainder == "pad" else math.floor)(N_SAMPLES / group)
    assert [len(batches) for batches in per_rank] == [expected] * world
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    seen = Counter(key for batches in per_rank for batch in batches for key in batch)
    repeated = sum(count - 1 for count in seen.values())
    if remainder == "drop":
        assert repeated == 0 and len(seen) == expected * group  # N mod G samples left out, nothing doubled
        assert N_SAMPLES - len(seen) == N_SAMPLES % group
    else:
        assert len(seen) == N_SAMPLES  # every sample seen; the documented padding repeats G - N mod G
        assert repeated == expected * group - N_SAMPLES < group


def test_batch_sequence_does_not_depend_on_worker_count(small_shards):
    shards, _, _ = small_shards
    reference = epoch_keys(loader_for(shards, 1, 2, workers=0))
    assert epoch_keys(loader_for(shards, 1, 2, workers=2)) == reference
    assert epoch_keys(loader_for(shards, 1, 2, workers=3, prefetch_batches=1)) == reference


def test_forever_streams_epochs_from_one_set_of_workers_in_the_same_order(small_shards):
    """forever() keeps its workers across epochs: 25 batches of 4 per epoch on one rank, so
    with 3 workers each new epoch starts on a different worker; the sequence must still be
    epoch 0, then epoch 1, ... exactly as epoch-by-epoch iteration gives it."""
    shards, _, _ = small_shards
    by_epoch = loader_for(shards, workers=0)
    reference = [keys for _ in range(3) for keys in epoch_keys(by_epoch)]
    streamed = loader_for(shards, workers=3)
    keys = [b.keys for _, b in zip(range(len(reference)), streamed.forever(), strict=False)]
    assert keys == reference
    assert streamed.state_dict()["epoch"] == 3 and streamed.state_dict()["batches_consumed"] == 0


def test_a_script_left_iterating_forever_exits(small_shards, tmp_path):
    """A script that stops reading `forever()` at module level, its workers still running, must
    exit: multiprocessing's exit handler alone would SIGTERM the workers, which ignore it (they
    leave signals to their rank), and wait for them without a bound."""
    shards, _, _ = small_shards
    script = tmp_path / "script.py"
    script.write_text(
        "from pipeline.config import DataConfig\n"
        "from pipeline.data.loader import ShardedLoader\n"
        f"config = DataConfig(shards={str(shards)!r}, batch_per_rank=4, workers=2)\n"
        "batches = ShardedLoader(config, seed=0).forever()\n"
        "print(len(next(batches).keys), flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4"]


def test_a_state_saved_at_an_epochs_very_end_resumes_at_the_next_epoch(small_shards):
    """Older versions saved (epoch, batches_per_epoch) after an epoch's last batch."""
    shards, _, _ = small_shards
    straight = loader_for(shards)
    expected = [epoch_keys(straight) for _ in range(2)][1]
    resumed = loader_for(shards)
    resumed.load_state_dict({"epoch": 0, "batches_consumed": len(resumed)})
    assert [b.keys for _, b in zip(range(len(expected)), resumed.forever(), strict=False)] == expected


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_an_epoch_resumed_on_other_world_sizes_sees_every_remaining_sample_once(small_shards, remainder):
    """2 ranks x 5 batches of 4, then 1 rank x 7 batches, then 3 ranks of 3 to the epoch's end
    (each rank building its loader from the state rank 0 saved, as a resumed job does): no
    sample twice, and everything not consumed is seen, but for the remainder rule applied to
    what the last world size had left (35 samples in groups of 9)."""
    shards, _, _ = small_shards
    seen = []

    def segment(world, batches, state, batch_per_rank=4):
        loaders = [
            loader_for(shards, r, world, batch_per_rank=batch_per_rank, epoch_remainder=remainder) for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        counts = {len(loader) for loader in loaders}
        assert len(counts) == 1, "ranks disagree on the epoch's length"
        for loader in loaders:
            taken = [b.keys for _, b in zip(range(batches), loader, strict=False)] if batches else epoch_keys(loader)
            seen.extend(key for keys in taken for key in keys)
        return loaders[0].state_dict(), counts.pop()

    state, _ = segment(2, 5, None)
    state, _ = segment(1, 7, state)
    assert len(seen) == len(set(seen)) == 68
    state, length = segment(3, 0, state, batch_per_rank=3)
    assert state["epoch"] == 1 and state["history"] == [] and state["batches_consumed"] == 0
    counts = Counter(seen)
    if remainder == "drop":
        assert length == 35 // 9 and max(counts.values()) == 1 and len(counts) == N_SAMPLES - 35 % 9
    else:
        assert length == math.ceil(35 / 9) and len(counts) == N_SAMPLES
        assert sum(counts.values()) - N_SAMPLES == 9 - 35 % 9  # the padding repeats from the remaining samples
    next_epoch = loader_for(shards, 0, 3, batch_per_rank=3, epoch_remainder=remainder)
    next_epoch.load_state_dict(state)
    assert epoch_keys(next_epoch) == [b.keys for b in _epoch_of(shards, 1, remainder)]  # a plain epoch again


def _epoch_of(shards, epoch, remainder):
    """Rank 0 of 3 (batch 3): epoch `epoch` of a run that always had this world size."""
    loader = loader_for(shards, 0, 3, batch_per_rank=3, epoch_remainder=remainder)
    for _ in range(epoch):
        epoch_keys(loader)
    return list(loader)


def test_shuffle_is_a_function_of_seed_and_epoch(small_shards):
    shards, _, _ = small_shards
    first = loader_for(shards, seed=5)
    epochs = [epoch_keys(first), epoch_keys(first)]
    again = loader_for(shards, seed=5)
    assert [epoch_keys(again), epoch_keys(again)] == epochs  # same seed: same order, epoch after epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert epoch_keys(loader_for(shards, seed=6)) != epochs[0]
    flat = [k for batch in epochs[0] for k in batch]
    assert flat != sorted(flat)  # samples are mixed, not just shards
    unshuffled = [k for batch in epoch_keys(loader_for(shards, shuffle=False)) for k in batch]
    assert unshuffled == sorted(unshuffled)


def test_batches_hold_the_stored_images_and_labels(small_shards):
    shards, images, labels = small_shards
    for batch in loader_for(shards, workers=1):
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 8, 8, 1)  # scaled on the device
        index = [int(key) for key in batch.keys]
        assert torch.equal(batch.images, torch.from_numpy(images[index]).unsqueeze(-1))
        assert batch.labels.tolist() == labels[index].tolist()


@pytest.mark.parametrize("stop_after", [3, 11, 13])  # mid-epoch, at the epoch's end, in the second epoch
def test_resume_two_ranks_two_workers_yields_the_same_batches(small_shards, stop_after):
    shards, _, _ = small_shards
    for rank in range(2):
        straight = loader_for(shards, rank, 2, workers=2)
        straight_keys = [b.keys for _, b in zip(range(20), straight.forever(), strict=False)]
        first = loader_for(shards, rank, 2, workers=2)
        keys = [b.keys for _, b in zip(range(stop_after), first.forever(), strict=False)]
        state = first.state_dict()
        resumed = loader_for(shards, rank, 2, workers=2)
        resumed.load_state_dict(state)
        keys += [b.keys for _, b in zip(range(20 - stop_after), resumed.forever(), strict=False)]
        assert keys == straight_keys, f"rank {rank}"


def image_member(shards, key):
    """The tar member name of sample KEY's image in the fixture's format (png or raw)."""
    return f"{key}.{load_manifest(shards)['image_ext']}"


def rewrite_member(path, member_name, data):
    """Replace one member's bytes (same tar structure, new content)."""
    with tarfile.open(path) as tf:
        assert member_name in tf.getnames()
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for member, content in members:
            content = data if member.name == member_name else content
            member.size = len(content)
            tf.addfile(member, io.BytesIO(content))


def reindex(shards, name):
    """Write shard NAME's index and manifest size anew for the shard as it is now, as `prepare`
    would have written them for it: the loader then reads the rewritten shard through its index
    instead of walking it. (The manifest's sha256s stay stale: only `data.verify` reads them.)"""
    path = shards / name
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(shard for shard in manifest["splits"]["train"]["shards"] if shard["name"] == name)
    columns = entry["index"]["members"]
    rows = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            offsets, sizes = rows.setdefault(key, ([-1] * len(columns), [-1] * len(columns)))
            offsets[columns.index(ext)], sizes[columns.index(ext)] = member.offset_data, member.size
    np.save(path.with_suffix(".idx.npy"), index_table([(key, *row) for key, row in rows.items()]))
    entry["bytes"] = path.stat().st_size
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_sample_is_skipped_counted_and_logged(small_shards, caplog):
    shards, _, _ = small_shards
    rewrite_member(shards / "train-000002.tar", image_member(shards, "000000021"), b"\x89PNG\r\n\x1a\n garbage")
    loader = loader_for(shards, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader)
    assert len(batches) == N_SAMPLES // 4
    assert loader.corrupt_samples == 1 and sum(b.n_corrupt for b in batches) == 1
    assert "000000021" not in [k for b in batches for k in b.keys]
    assert "skipping corrupt sample 000000021" in caplog.text and "train-000002.tar" in caplog.text
    # The rewritten shard no longer matches its index, so it was walked: the walk finds the damage.
    assert "train-000002.tar changed since its index was written" in caplog.text


def without_indexes(shards):
    """The dataset as `prepare` wrote it before shard indexes: the loader walks the tar headers."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["index"]
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_indexed_and_walked_shards_give_identical_batches(small_shards):
    shards, _, _ = small_shards
    indexed = list(loader_for(shards, 1, 2, workers=1))
    without_indexes(shards)
    walked = list(loader_for(shards, 1, 2, workers=1))
    assert len(indexed) == len(walked) == N_SAMPLES // 8
    for a, b in zip(indexed, walked, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_the_index_reads_past_a_damaged_tar_header_that_ends_the_walk(small_shards):
    """The index path reads members' data without their headers' checksums: a damaged header
    costs nothing there, where the walk cannot go on past it and counts the shard's 10 samples
    missing. (So this also shows which path read the shard.)"""
    shards, _, _ = small_shards
    path = shards / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01  # the first member's name: its header's checksum fails
    path.write_bytes(bytes(data))
    indexed = loader_for(shards, shuffle=False)
    assert len(list(indexed)) == N_SAMPLES // 4 and indexed.corrupt_samples == 0
    without_indexes(shards)
    walked = loader_for(shards, shuffle=False)
    assert len(list(walked)) == N_SAMPLES // 4 and walked.corrupt_samples == 10


def test_an_unusable_index_is_named_and_its_shard_walked(small_shards, caplog):
    shards, _, _ = small_shards
    reference = list(loader_for(shards, shuffle=False))
    (shards / "train-000003.idx.npy").write_bytes(b"not an index")
    table = np.load(shards / "train-000004.idx.npy")  # the right layout but float offsets
    floats = [("key", table.dtype["key"]), ("offset", "<f8", (2,)), ("size", "<i8", (2,))]
    np.save(shards / "train-000004.idx.npy", table.astype(floats))
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader_for(shards, shuffle=False))
    assert "train-000003.idx.npy unusable" in caplog.text and "walking its tar headers" in caplog.text
    assert "train-000004.idx.npy unusable" in caplog.text
    for a, b in zip(batches, reference, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)


def test_an_index_pointing_past_its_shard_is_stale_and_the_shard_walked(small_shards, caplog):
    shards, _, _ = small_shards
    reference = list(loader_for(shards, shuffle=False))
    path = shards / "train-000001.idx.npy"
    table = np.load(path)
    table["offset"][3], table["size"][3] = 2**62, 2**62  # past any file; their sum overflows int64
    np.save(path, table)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader_for(shards, shuffle=False))
    assert "train-000001.tar changed since its index was written" in caplog.text
    for a, b in zip(batches, reference, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)


@pytest.mark.parametrize("through_index", [False, True])  # the shard walked, or read through its index
@pytest.mark.parametrize("size", [7, 9])  # a smaller and a larger image than the dataset's 8x8
def test_wrong_image_shape_counts_as_corrupt(small_shards, size, through_index, caplog):
    shards, _, _ = small_shards
    from PIL import Image

    member = image_member(shards, "000000003")
    if member.endswith(".png"):
        wrong = io.BytesIO()
        Image.new("L", (size, size)).save(wrong, format="PNG")
        data = wrong.getvalue()
    else:
        data = bytes(size * size)  # raw: a member of the wrong length (a square of another side)
    rewrite_member(shards / "train-000000.tar", member, data)
    if through_index:
        reindex(shards, "train-000000.tar")
    loader = loader_for(shards)  # in this process, where caplog sees the warning
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert len(list(loader)) == N_SAMPLES // 4 and loader.corrupt_samples == 1
    assert "skipping corrupt sample 000000003" in caplog.text
    assert ("changed since its index was written" in caplog.text) != through_index


def test_batches_kept_by_the_caller_stay_intact(small_shards):
    """Workers build batches in a ring of reused shared-memory buffers: a batch the caller keeps
    must not change when its buffer is reused (25 batches through two rings of 3 slots)."""
    shards, _, _ = small_shards
    kept = list(loader_for(shards, workers=2, prefetch_batches=1))
    built_in_process = list(loader_for(shards, workers=0))
    assert len(kept) == len(built_in_process) == 25
    for batch, reference in zip(kept, built_in_process, strict=True):
        assert batch.keys == reference.keys and torch.equal(batch.images, reference.images)


def test_raw_and_png_shards_give_bit_identical_batches(tmp_path):
    from pipeline.data.prepare import Transform, prepare
    from tests.conftest import make_npz

    make_npz(tmp_path / "src.npz", 50, channels=3)
    for fmt in ("raw", "png"):
        prepare(str(tmp_path / "src.npz"), tmp_path / fmt, Transform(8, 3, image_format=fmt), 16, progress=False)
    batches = {fmt: list(loader_for(tmp_path / fmt, 1, 2, workers=1)) for fmt in ("raw", "png")}
    assert len(batches["raw"]) == len(batches["png"]) == 50 // 8
    for raw, png in zip(batches["raw"], batches["png"], strict=True):
        assert raw.keys == png.keys and torch.equal(raw.labels, png.labels)
        assert raw.images.shape == (4, 8, 8, 3) and torch.equal(raw.images, png.images)


@pytest.mark.parametrize("through_index", [False, True])
def test_unreadable_class_counts_as_corrupt(small_shards, through_index, caplog):
    shards, _, _ = small_shards
    rewrite_member(shards / "train-000001.tar", "000000012.cls", b"seven")
    if through_index:
        reindex(shards, "train-000001.tar")
    loader = loader_for(shards, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert len(list(loader)) == N_SAMPLES // 4
    assert loader.corrupt_samples == 1 and "class b'seven' is not an integer" in caplog.text
    assert ("changed since its index was written" in caplog.text) != through_index


def test_truncated_shard_keeps_batch_counts_equal(small_shards):
    shards, _, _ = small_shards
    path = shards / "train-000004.tar"
    path.write_bytes(path.read_bytes()[: 512 * 9])  # keeps the first samples, cuts one mid-member
    per_rank = [loader_for(shards, r, 2, workers=2) for r in range(2)]
    counts = [len(list(loader)) for loader in per_rank]
    assert counts == [N_SAMPLES // 8] * 2
    assert sum(loader.corrupt_samples for loader in per_rank) >= 8  # most of the shard's 10 samples are gone


def test_missing_shard_is_an_error_at_start(small_shards):
    shards, _, _ = small_shards
    (shards / "train-000007.tar").unlink()
    with pytest.raises(UserError, match="1 shard\\(s\\) missing or unreachable: .*train-000007.tar"):
        loader_for(shards)


def test_verify_checks_sha256(small_shards):
    shards, _, _ = small_shards
    loader_for(shards, verify=True)  # intact: passes
    path = shards / "train-000003.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch .* train-000003.tar"):
        loader_for(shards, verify=True)
    path.write_bytes(bytes(data[:700] + bytes([data[700] ^ 0xFF]) + data[701:]))  # the shard intact again
    index = shards / "train-000005.idx.npy"
    index.write_bytes(index.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="sha256 mismatch .* train-000005.idx.npy"):
        loader_for(shards, verify=True)


def test_dataset_too_small_for_one_batch_per_rank(small_shards):
    shards, _, _ = small_shards
    with pytest.raises(UserError, match="cannot fill one batch on every rank.*epoch_remainder: pad"):
        loader_for(shards, world=3, batch_per_rank=40)
    assert len(loader_for(shards, world=3, batch_per_rank=40, epoch_remainder="pad")) == 1


def test_pipe_urls_are_refused_unless_allowed(small_shards):
    shards, _, _ = small_shards
    pattern = f"pipe:cat {shards}/train-{{000000..000010}}.tar"
    with pytest.raises(UserError, match="runs a shell command.*allow_pipe"):
        loader_for(pattern)
    allowed = loader_for(pattern, allow_pipe=True, shuffle=False)
    assert epoch_keys(allowed) == epoch_keys(loader_for(shards, shuffle=False))


def test_url_pattern_over_http(small_shards):
    shards, _, _ = small_shards
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        loader = loader_for(f"{base}/train-{{000000..000010}}.tar", workers=2)
        assert epoch_keys(loader) == epoch_keys(loader_for(shards, workers=2))
        with pytest.raises(UserError, match="missing or unreachable: .*train-000011.tar"):
            loader_for(f"{base}/train-{{000010..000011}}.tar")
    finally:
        server.shutdown()


def test_tar_header_checksum_agrees_with_the_exact_byte_sum(small_shards):
    """The reader checks headers with the byte sum modulo 65521 (computed in C, for speed);
    on real headers, and on those headers with 1-4 random bytes damaged, it must accept and
    refuse exactly what the ustar definition (the plain sum, the field counted as spaces) does."""
    import random

    from pipeline.data.shards import _checksum_ok, _octal

    shards, _, _ = small_shards
    data = sorted(shards.glob("*.tar"))[0].read_bytes()
    headers, offset = [], 0
    while data[offset : offset + 512] != bytes(512):
        header = data[offset : offset + 512]
        headers.append(header)
        offset += 512 + ((int(header[124:136].rstrip(b"\0 "), 8) + 511) & ~511)

    def exact(header: bytes) -> bool:
        try:
            return _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 256
        except ValueError:  # a damaged checksum field: refused either way
            return False

    def fast(header: bytes) -> bool:
        try:
            return _checksum_ok(header)
        except ValueError:
            return False

    assert len(headers) == 20 and all(exact(h) and fast(h) for h in headers)
    rng, refused = random.Random(0), 0
    for _ in range(20000):
        damaged = bytearray(rng.choice(headers))
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(512)] = rng.randrange(256)
        assert fast(bytes(damaged)) == exact(bytes(damaged))
        refused += not exact(bytes(damaged))
    assert refused > 19000

"""`pipeline prepare SOURCE OUT_DIR`: any image source -> WebDataset tar shards + manifest.json.

Each sample is `<key>.png` (or `.jpg`, or `.raw`: the uncompressed uint8 H x W x C bytes,
whose shape and dtype the manifest records) plus `<key>.cls` (ASCII class index) when the
source has labels. Keys are the source's stable item index, zero-padded, so the same
source always gives the same keys and, with the same options, byte-identical shards.
A prepared dataset (its manifest) is a source too: that re-encodes it into another format
keeping every sample's key, label and split.

Crash safety: shards are written into `OUT_DIR/.staging-<pid>/` and moved into place
only when all are complete; manifest.json is written last by atomic rename, after
any old manifest has been removed. An interrupted run therefore leaves either the
previous complete dataset or no manifest, never a manifest naming partial shards.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import pipeline
from pipeline.data.decode import BadSample, open_image
from pipeline.data.manifest import FORMAT, INDEX_SUFFIX, MANIFEST_NAME, index_table, sha256_file
from pipeline.data.sources import Item, cpu_count, iter_chunks, open_source, part_range
from pipeline.errors import UserError
from pipeline.files import write_json_atomic

FILTERS = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
FORMATS = ("raw", "png", "jpg")
REJECTS_NAME = "rejects.jsonl"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class Transform:
    resolution: int = 32
    channels: int = 1
    filter: str = "auto"  # box when shrinking, bilinear when enlarging
    image_format: str = "raw"
    quality: int = 95  # jpg only

    def __post_init__(self):
        if self.resolution < 4:
            raise UserError(f"--resolution must be >= 4, got {self.resolution}")
        if self.channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3, got {self.channels}")
        if self.filter != "auto" and self.filter not in FILTERS:
            raise UserError(f"--filter must be auto or one of {', '.join(FILTERS)}, got {self.filter!r}")
        if self.image_format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")


def _to_pil(payload) -> Image.Image:
    if isinstance(payload, Exception):  # the source could not read this item (a damaged archive member)
        raise BadSample(f"unreadable ({type(payload).__name__}: {payload})")
    if isinstance(payload, np.ndarray):
        array = payload[..., 0] if payload.ndim == 3 and payload.shape[2] == 1 else payload
        return Image.fromarray(np.ascontiguousarray(array))
    if isinstance(payload, (str, Path)):
        try:
            payload = Path(payload).read_bytes()
        except OSError as exc:
            raise BadSample(f"unreadable ({exc.strerror})") from None
    return open_image(payload)


def _normalise_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: keep the top 8 bits
        array = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((array >> (16 if image.mode == "I" and array.max() > 65535 else 8)).astype(np.uint8))
    try:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return image.convert("L" if channels == 1 else "RGB")
    except (ValueError, OSError) as exc:  # a mode or palette Pillow cannot convert
        raise BadSample(f"cannot convert its mode {image.mode} ({exc})") from None


def transform_image(payload, transform: Transform) -> bytes:
    """Decode, center-crop to a square, resize, convert channels, encode (raw: just the bytes)."""
    image = _normalise_mode(_to_pil(payload), transform.channels)
    width, height = image.size
    side = min(width, height)
    if side < 1:
        raise BadSample("empty image")
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != transform.resolution:
        name = transform.filter
        if name == "auto":
            name = "box" if side > transform.resolution else "bilinear"
        image = image.resize((transform.resolution, transform.resolution), FILTERS[name])
    if transform.image_format == "raw":
        return np.asarray(image, dtype=np.uint8).tobytes()  # H x W (x C), C-order: what decode_raw reads
    out = io.BytesIO()
    if transform.image_format == "png":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="JPEG", quality=transform.quality)
    return out.getvalue()


def _process_chunk(args: tuple[list[tuple[Item, str]], Transform]) -> list[tuple]:
    """Runs in a pool worker: each (item, key) becomes ("ok", index, (members, offsets, sizes))
    (see sample_members) or ("reject", index, (source_id, reason))."""
    items, transform = args
    results = []
    for item, key in items:
        try:
            image = transform_image(item.payload, transform)
            results.append(("ok", item.index, sample_members(key, transform.image_format, image, item.label)))
        except BadSample as exc:  # an image that does not decode is a reject, never the end of the run
            results.append(("reject", item.index, (item.source_id, str(exc))))
    return results


def _worker_init(parent_pid: int) -> None:
    """Pool workers leave Ctrl-C / SIGTERM to the parent, which cleans up and stops them, and die
    with it: a parent killed outright (SIGKILL) must not leave workers waiting forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent-pid check below still applies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class _StopFlag:
    """Records SIGINT/SIGTERM; the write loop checks it between chunks. Raising straight from the
    handler could fire inside Pool.imap while it holds its condition lock and deadlock terminate()."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum

    def check(self):
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(self.signum).name)


def split_of(source_id: str, val_fraction: float, split_seed: int) -> str:
    """Deterministic per sample, independent of order and of the other samples."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{split_seed}:{source_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


# A regular-file member's USTAR header as tarfile writes it with our fixed metadata (mode 644,
# mtime 0, uid/gid 0, no user or group names), for a name and size patched in by tar_member.
# Its checksum field holds 8 spaces, as when the checksum is computed (POSIX ustar).
_HEADER = tarfile.TarInfo("").tobuf(tarfile.USTAR_FORMAT)
_HEADER = _HEADER[:148] + b" " * 8 + _HEADER[156:]
_RECORD = tarfile.RECORDSIZE


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, zero padding to 512 bytes), byte for byte what
    tarfile.addfile writes for it: made in the pool workers, so the one process that writes the
    shards only appends. (tarfile.addfile's TarInfo copy and field-by-field header cost that
    process 55 us a member, most of its time, and capped 2 workers at 1.67x one.)"""
    encoded = name.encode()
    if len(encoded) > 100:  # USTAR splits long names into prefix/name: leave that to tarfile
        info = tarfile.TarInfo(name)
        info.size = len(data)
        header = info.tobuf(tarfile.USTAR_FORMAT)
    else:
        header = bytearray(_HEADER)
        header[: len(encoded)] = encoded
        header[124:136] = b"%011o\0" % len(data)
        header[148:155] = b"%06o\0" % sum(header)  # the checksum field counts as 8 spaces in it
    return bytes(header) + data + bytes(-len(data) % 512)


def sample_members(key: str, ext: str, image: bytes, label: int | None) -> tuple[bytes, list[int], list[int]]:
    """A sample's members (`KEY.EXT`, `KEY.cls` when labelled) as tar bytes, and where each
    member's data lies in them and its size (-1: no label), for the shard's index."""
    members = tar_member(f"{key}.{ext}", image)
    offsets, sizes = [512, -1], [len(image), -1]
    if label is not None:
        text = str(label).encode()
        offsets[1], sizes[1] = len(members) + 512, len(text)
        members += tar_member(f"{key}.cls", text)
    return members, offsets, sizes


class ShardWriter:
    """Writes `<split>-000000.tar`, ... with exactly `samples_per_shard` samples each but the last,
    and next to each its member index (`<split>-000000.idx.npy`, see manifest.index_table)."""

    def __init__(self, folder: Path, split: str, samples_per_shard: int, ext: str):
        self.folder, self.split, self.per_shard, self.ext = folder, split, samples_per_shard, ext
        self.shards: list[dict] = []
        self._file = None  # the shard being written, open across write() calls until it is full
        self._hash = None  # its sha256 so far
        self._index: list[tuple[str, list[int], list[int]]] = []  # (key, offsets, sizes) of each sample

    def write(self, key: str, image: bytes, label: int | None) -> None:
        self.append(key, *sample_members(key, self.ext, image, label))

    def append(self, key: str, members: bytes, offsets: list[int], sizes: list[int]) -> None:
        """Appends a sample made by sample_members (offsets relative to its first byte)."""
        if self._file is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._file, self._hash = open(self.folder / name, "wb"), hashlib.sha256()  # noqa: SIM115
            self.shards.append({"name": name, "count": 0, "bytes": 0})
        start = self.shards[-1]["bytes"]
        self._file.write(members)
        self._hash.update(members)
        self.shards[-1]["bytes"] += len(members)
        self._index.append((key, [start + o if s >= 0 else -1 for o, s in zip(offsets, sizes, strict=True)], sizes))
        self.shards[-1]["count"] += 1
        if self.shards[-1]["count"] == self.per_shard:
            self._close_current()

    def _close_current(self) -> None:
        if self._file is None:
            return
        shard = self.shards[-1]
        # The end of the archive as tarfile writes it: two zero blocks, then zeros to a whole record.
        end = bytes(1024 + (-(shard["bytes"] + 1024) % _RECORD))
        self._file.write(end)
        self._hash.update(end)
        shard["bytes"] += len(end)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        shard["sha256"] = self._hash.hexdigest()
        index = (self.folder / shard["name"]).with_suffix(INDEX_SUFFIX)
        with open(index, "wb") as f:
            np.save(f, index_table(self._index), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        members = [self.ext, "cls"]
        shard["index"] = {"name": index.name, "members": members, "sha256": sha256_file(index)}
        self._index = []

    def close(self) -> dict:
        self._close_current()
        return {"count": sum(s["count"] for s in self.shards), "shards": self.shards}


@dataclass
class PrepareSummary:
    count: int
    rejects: int
    seconds: float
    splits: dict
    out_dir: str

    def line(self) -> str:
        splits = ", ".join(f"{k}: {v['count']} in {len(v['shards'])} shards" for k, v in self.splits.items())
        rate = self.count / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"prepared {self.count} images ({splits}); {self.rejects} rejected; "
            f"{self.seconds:.1f} s ({rate:.0f} img/s) -> {self.out_dir}"
        )


def _existing_output(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return [p for p in out_dir.iterdir() if p.name == MANIFEST_NAME or p.name.endswith((".tar", INDEX_SUFFIX))]


def _commit(staging: Path, out_dir: Path, manifest: dict) -> None:
    """Old manifest goes first (so it never names replaced shards), new manifest last."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for old in _existing_output(out_dir):
        old.unlink()
    (out_dir / REJECTS_NAME).unlink(missing_ok=True)
    for new in sorted(staging.iterdir()):
        os.replace(new, out_dir / new.name)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    shutil.rmtree(staging, ignore_errors=True)


def _commit_part(staging: Path, out_dir: Path, part: tuple[int, int], manifest: dict) -> Path:
    """Swap the staged part in for OUT_DIR/parts/I: two renames, between which the part is
    missing (a merge then names it), never half old and half new."""
    manifest["part"] = {"index": part[0], "of": part[1]}
    write_json_atomic(staging / MANIFEST_NAME, manifest)
    final = out_dir / "parts" / str(part[0])
    old = final.with_name(f".{part[0]}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def prepare(
    source_spec: str,
    out_dir: str | Path,
    transform: Transform = Transform(),
    samples_per_shard: int = 1000,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    use_labels: bool = True,
    subset: str = "train",
    limit: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    label_field: str | None = None,
    allow_pipe: bool = False,
    part: tuple[int, int] | None = None,
) -> PrepareSummary:
    """Prepare SOURCE into OUT_DIR; with `part` (I, N), only the I-th of N parts of the source,
    into OUT_DIR/parts/I/ (see merge_parts), replacing that part if it is there."""
    if part is not None and not 0 <= part[0] < part[1]:
        raise UserError(f"--part {part[0]}/{part[1]}: I must be in 0..N-1")
    if part is not None and limit:
        raise UserError("--limit cannot be combined with --part (a part's share would not be the whole's)")
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a folder")
    if part is None and _existing_output(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already holds shards or a manifest; pass --overwrite to replace them")
    source = open_source(source_spec, use_labels, subset, label_field, allow_pipe, part)
    items = source.items[:limit] if limit else source.items
    if part is not None and source.kind != "webdataset":  # a shard set listed only its part's shards
        share = part_range(len(items), part)
        items = items[share.start : share.stop]
    if not items:
        which = f"part {part[0]}/{part[1]} of " if part else ""
        raise UserError(f"{which}source {source_spec} holds no images")

    # A part is staged beside its folder, as `.I.staging-PID`; the rest, inside OUT_DIR.
    stage_in, stage_name = (out_dir / "parts", f".{part[0]}.") if part else (out_dir, ".")
    staging = stage_in / f"{stage_name}staging-{os.getpid()}"
    try:
        stage_in.mkdir(parents=True, exist_ok=True)
        for stale in [*stage_in.glob(f"{stage_name}staging-*"), *stage_in.glob(f"{stage_name}old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (SIGKILL cannot clean up)
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write into {out_dir} ({exc.strerror}): choose a folder you can write") from None
    ext = transform.image_format
    writers = {name: ShardWriter(staging, name, samples_per_shard, ext) for name in ("train", "val")}
    rejects: list[dict] = []
    key_width = max(9, len(str(len(source.items))))
    workers = workers or cpu_count()
    started = time.perf_counter()
    keyed = ((item, item.key or f"{item.index:0{key_width}d}") for item in items)
    chunks = ((chunk, transform) for chunk in iter_chunks(keyed, 256))
    # Explicit handlers: a background job may inherit SIGINT ignored, and SIGTERM (scheduler
    # kill) should clean up the staging folder like Ctrl-C does.
    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    # A futures pool with a bounded window of chunks in flight, not multiprocessing.Pool:
    # Pool.terminate() can deadlock when it kills a worker holding the task-queue lock, so an
    # interrupt could hang; here shutdown only waits for the few chunks already running.
    executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init, initargs=(os.getpid(),)
    )
    try:
        with tqdm(total=len(items), unit="img", desc="prepare", disable=not progress, mininterval=1.0) as bar:
            in_flight = collections.deque(
                executor.submit(_process_chunk, c) for c in itertools.islice(chunks, 2 * workers)
            )
            while in_flight:
                results = in_flight.popleft().result()  # in order: reproducible shard contents
                stop.check()
                in_flight.extend(executor.submit(_process_chunk, c) for c in itertools.islice(chunks, 1))
                for kind, index, result in results:
                    if kind == "ok":
                        item = source.items[index]
                        split = item.split or split_of(item.source_id, val_fraction, split_seed)
                        writers[split].append(item.key or f"{index:0{key_width}d}", *result)
                    else:
                        rejects.append({"index": index, "source_id": result[0], "reason": result[1]})
                bar.update(len(results))
                bar.set_postfix(rejected=len(rejects), refresh=False)
        stop.check()
        splits = {name: w.close() for name, w in writers.items() if w.shards}
        count = sum(s["count"] for s in splits.values())
        if count == 0:
            first = rejects[0]["reason"] if rejects else "none"
            raise UserError(f"source {source_spec}: no valid image among {len(items)} (first reason: {first})")
        if rejects:
            with open(staging / REJECTS_NAME, "w") as f:
                for r in rejects:
                    f.write(json.dumps(r) + "\n")
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT,
            "tool_version": pipeline.__version__,
            "created_unix": int(time.time()),
            "source": source.describe() | {"used_items": len(items)},
            "transform": {
                "resolution": transform.resolution,
                "channels": transform.channels,
                "filter": transform.filter,
                "image_format": transform.image_format,
                "quality": transform.quality if ext == "jpg" else None,
                "crop": "center-square",
            },
            "resolution": transform.resolution,
            "channels": transform.channels,
            "image_ext": ext,
            "sample": {"shape": [transform.resolution, transform.resolution, transform.channels], "dtype": "uint8"},
            "labels": {"num_classes": len(source.class_names), "class_names": source.class_names}
            if source.class_names
            else None,
            "samples_per_shard": samples_per_shard,
            "split": {"val_fraction": val_fraction, "split_seed": split_seed},
            "count": count,
            "rejects": len(rejects),
            "splits": splits,
        }
        if part is None:
            _commit(staging, out_dir, manifest)
        else:
            out_dir = _commit_part(staging, out_dir, part, manifest)
    except BaseException as exc:
        executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # the folder, not our code: disk, quota, rights
            raise UserError(f"writing {exc.filename or out_dir} failed ({exc.strerror})") from None
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return PrepareSummary(count, len(rejects), seconds, splits, str(out_dir))

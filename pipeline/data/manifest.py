"""The shard manifest: what `prepare` wrote, and what the loader trusts.

manifest.json is the last file `prepare` writes (atomic rename), so a manifest
always describes complete shards. Its sha256 (`manifest_hash`) identifies the
dataset for caches and for tracking.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.files import require_fields

MANIFEST_NAME = "manifest.json"
FORMAT = "gan-pipeline-shards/1"
INDEX_SUFFIX = ".idx.npy"
# What every reader of a manifest relies on (the loader, stream, re-encoding, FID references).
MANIFEST_FIELDS = {"count": int, "resolution": int, "channels": int, "splits": dict}
SHARD_FIELDS = {"name": str, "count": int}


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie in a shard, written by `prepare` next to it: a local
    loader then reads a sample's data without walking the tar headers before it."""

    path: str
    members: tuple[str, ...]  # the table's member columns, e.g. ("raw", "cls")
    sha256: str | None = None


@dataclass(frozen=True)
class ShardEntry:
    url: str  # local path or URL the loader opens
    count: int  # samples in the shard
    sha256: str | None = None
    bytes: int | None = None
    index: ShardIndex | None = None


def index_table(samples: list[tuple[str, list[int], list[int]]]) -> np.ndarray:
    """A shard's index as one structured array, one row per sample in shard order: its key
    (UTF-8), and per member column the data's byte offset in the shard and its size (-1 for a
    member the sample lacks). Saved with np.save and read back with allow_pickle=False."""
    keys = [key.encode() for key, _, _ in samples]
    columns = len(samples[0][1])
    dtype = [("key", f"S{max(map(len, keys))}"), ("offset", "<i8", (columns,)), ("size", "<i8", (columns,))]
    table = np.empty(len(samples), dtype=dtype)
    table["key"] = keys
    table["offset"] = [offsets for _, offsets, _ in samples]
    table["size"] = [sizes for _, _, sizes in samples]
    return table


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_manifest_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return path


def load_manifest(spec: str | Path) -> dict:
    path = resolve_manifest_path(spec)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"manifest not found: {path} (run `python -m pipeline prepare` first)") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"manifest {path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"manifest {path}: not a {FORMAT} manifest")
    require_fields(manifest, MANIFEST_FIELDS, f"manifest {path}")
    for split, listing in manifest["splits"].items():
        shards = listing.get("shards") if isinstance(listing, dict) else None
        if not isinstance(shards, list):
            raise UserError(f"manifest {path}: split {split!r} lists no shards")
        for shard in shards:
            require_fields(shard if isinstance(shard, dict) else {}, SHARD_FIELDS, f"manifest {path}, split {split!r}")
    manifest["_path"] = str(path)
    manifest["_hash"] = hashlib.sha256(raw).hexdigest()
    return manifest


def manifest_shards(manifest: dict, split: str) -> list[ShardEntry]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"manifest {manifest['_path']} has no split {split!r} (it has: {', '.join(splits)})")
    folder = Path(manifest["_path"]).parent

    def index_of(shard: dict) -> ShardIndex | None:
        index = shard.get("index")  # absent in datasets prepared before indexes
        if not index:
            return None
        return ShardIndex(str(folder / index["name"]), tuple(index["members"]), index.get("sha256"))

    return [
        ShardEntry(str(folder / s["name"]), int(s["count"]), s.get("sha256"), s.get("bytes"), index_of(s))
        for s in splits[split]["shards"]
    ]

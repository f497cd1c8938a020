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

from pipeline.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "gan-pipeline-shards/1"


@dataclass(frozen=True)
class ShardEntry:
    url: str  # local path or URL the loader opens
    count: int  # samples in the shard
    sha256: str | None = None
    bytes: int | None = None


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
    manifest["_path"] = str(path)
    manifest["_hash"] = hashlib.sha256(raw).hexdigest()
    return manifest


def manifest_shards(manifest: dict, split: str) -> list[ShardEntry]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"manifest {manifest['_path']} has no split {split!r} (it has: {', '.join(splits)})")
    folder = Path(manifest["_path"]).parent
    return [
        ShardEntry(str(folder / s["name"]), int(s["count"]), s.get("sha256"), s.get("bytes"))
        for s in splits[split]["shards"]
    ]

"""`pipeline prepare SHARDS OUT_DIR --index-only`: our manifest and shard indexes beside a
WebDataset shard set written by another tool, without rewriting a byte of it.

It applies where the shards already hold what the loader would make of them: every sample an
image (jpg, jpeg, png or webp) of exactly the chosen side and channels (L for 1, RGB for 3),
labels, if any, as `.cls`. Each shard is read once: its members located (tarfile's own header
walk: ustar, pax and GNU headers alike), every image's header opened to check its size and
mode, the shard's sha256 taken. The loader then reads the shards in place, through the
indexes, and decodes each image as it does png or jpg shards of ours. A sample that does not
fit, or lacks an image, cannot be left out without a rewrite: the run stops, naming how many
and the first, and says to prepare without --index-only (which re-encodes and lists rejects).
Local shards only, as an index holds byte offsets into a local file.

Which process runs it: one.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline
from pipeline.data.manifest import FORMAT, INDEX_SUFFIX, MANIFEST_NAME, index_table, sha256_file
from pipeline.data.prepare import PrepareSummary
from pipeline.data.shards import expand_urls, local_path, split_key
from pipeline.data.sources import FOREIGN_IMAGE_EXTENSIONS
from pipeline.errors import UserError
from pipeline.files import write_json_atomic

MODES = {"L": 1, "RGB": 3}


def index_only(
    spec: str, out_dir: str | Path, resolution: int | None, channels: int | None, use_labels: bool = True
) -> PrepareSummary:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    urls = expand_urls(spec)
    paths = [local_path(url) for url in urls]
    if any(path is None for path in paths):
        raise UserError(f"--index-only needs local shards (an index holds byte offsets): {urls[paths.index(None)]}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} shard(s) missing: {', '.join(missing[:3])}")
    if (out_dir / MANIFEST_NAME).exists():
        raise UserError(f"{out_dir} already holds a manifest; remove it to index the shards again")
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = {"resolution": resolution, "channels": channels}
    shards, misfits, exts, labels = [], [], Counter(), []
    for number, path in enumerate(paths):
        samples, digest = _walk(path, layout, misfits, exts, labels if use_labels else None)
        if not samples:  # an empty shard adds nothing to read
            continue
        index = out_dir / f"{number:06d}{INDEX_SUFFIX}"
        with open(index, "wb") as f:
            np.save(f, index_table(samples), allow_pickle=False)
        shards.append(
            {
                "name": str(path.resolve()),
                "count": len(samples),
                "bytes": path.stat().st_size,
                "sha256": digest,
                "index": {"name": index.name, "members": [*MEMBERS], "sha256": sha256_file(index)},
            }
        )
        print(f"indexed {number + 1}/{len(paths)} shards ({sum(s['count'] for s in shards)} samples)", flush=True)
    if misfits:
        for stale in out_dir.glob(f"*{INDEX_SUFFIX}"):
            stale.unlink()
        side, depth = layout["resolution"], layout["channels"]
        raise UserError(
            f"{len(misfits)} sample(s) are not {side}x{side} images with {depth} channel(s) as they are "
            f"(first: {misfits[0]}); prepare without --index-only to re-encode them"
        )
    count = sum(s["count"] for s in shards)
    if labels and len(labels) != count:
        raise UserError(f"{count - len(labels)} of {count} samples have no .cls while the others have one")
    if count == 0:
        raise UserError(f"{spec}: the shards hold no samples")
    side, depth = layout["resolution"], layout["channels"]
    manifest = {
        "format": FORMAT,
        "tool_version": pipeline.__version__,
        "created_unix": int(time.time()),
        "source": {"spec": spec, "kind": "webdataset", "items": count, "used_items": count, "index_only": True},
        "resolution": side,
        "channels": depth,
        "image_ext": exts.most_common(1)[0][0],
        "sample": {"shape": [side, side, depth], "dtype": "uint8"},
        "labels": {"num_classes": max(labels) + 1, "class_names": [str(c) for c in range(max(labels) + 1)]}
        if labels
        else None,
        "count": count,
        "rejects": 0,
        "splits": {"train": {"count": count, "shards": shards}},
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return PrepareSummary(count, 0, time.perf_counter() - started, manifest["splits"], str(out_dir))


# The index's member columns: every image type a foreign shard may hold, then the class.
MEMBERS = (*FOREIGN_IMAGE_EXTENSIONS, "cls")


def _walk(path: Path, layout: dict, misfits: list, exts: Counter, labels: list | None) -> tuple[list, str]:
    """The shard's samples as index rows (key, offsets, sizes), its sha256; appends to `misfits`
    every sample that does not fit the layout (the first sample's image sets it if unset)."""
    data = path.read_bytes()
    samples: dict[str, tuple[list[int], list[int]]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                offsets, sizes = samples.setdefault(key, ([-1] * len(MEMBERS), [-1] * len(MEMBERS)))
                if ext in MEMBERS:
                    offsets[MEMBERS.index(ext)], sizes[MEMBERS.index(ext)] = member.offset_data, member.size
    except tarfile.TarError as exc:
        raise UserError(f"{path}: not a readable tar shard ({exc})") from None
    for key, (offsets, sizes) in samples.items():
        found = [i for i, size in enumerate(sizes[:-1]) if size >= 0]
        if not found:
            misfits.append(f"{path}#{key}: no image member")
            continue
        start, size = offsets[found[0]], sizes[found[0]]
        try:
            with Image.open(io.BytesIO(data[start : start + size])) as image:
                width, height, mode = *image.size, image.mode
        except Exception as exc:  # untrusted bytes: any failure of Pillow's is a bad sample
            misfits.append(f"{path}#{key}: does not open ({type(exc).__name__})")
            continue
        layout["resolution"] = layout["resolution"] or width
        layout["channels"] = layout["channels"] or MODES.get(mode)
        if (width, height) != (layout["resolution"],) * 2 or MODES.get(mode) != layout["channels"]:
            misfits.append(f"{path}#{key}: {width}x{height} {mode}")
        exts[MEMBERS[found[0]]] += 1
        if labels is not None and sizes[-1] >= 0:
            try:
                labels.append(int(data[offsets[-1] : offsets[-1] + sizes[-1]]))
            except ValueError:
                misfits.append(f"{path}#{key}: .cls is not a class index")
        elif labels is None:
            offsets[-1] = sizes[-1] = -1
    return [(key, offsets, sizes) for key, (offsets, sizes) in samples.items()], hashlib.sha256(data).hexdigest()

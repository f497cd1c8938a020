"""`pipeline prepare --merge OUT_DIR`: one manifest over the parts that `prepare --part I/N`
wrote into OUT_DIR/parts/0 .. N-1 (say, the tasks of a Slurm array: slurm/prepare.sbatch).

The shards stay where their part wrote them; the merged manifest names them by their path
under OUT_DIR (`parts/3/train-000000.tar`), so names cannot collide and nothing is copied.
Keys are the source's own stable ones (an item's index in the whole source, or a shard set's
shard and sample numbers), so they are unique across parts, and the merged dataset holds the
samples of a single-process `prepare` of the same source, in the same order.

Which process runs it: one, after every part has finished (the array's dependent job).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.manifest import MANIFEST_NAME, load_manifest
from pipeline.data.prepare import REJECTS_NAME, PrepareSummary
from pipeline.errors import UserError
from pipeline.files import require_fields, write_bytes_atomic, write_json_atomic

# What every part must share with the others for their union to be one dataset.
SHARED = ("format", "resolution", "channels", "image_ext", "sample", "transform", "samples_per_shard", "split")


def merge_parts(out_dir: str | Path) -> PrepareSummary:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    parts_dir = out_dir / "parts"
    found = sorted(int(p.name) for p in parts_dir.glob("*") if p.name.isdigit()) if parts_dir.is_dir() else []
    if not found:
        raise UserError(f"{parts_dir}: no parts to merge (run `prepare SOURCE {out_dir} --part I/N` first)")
    manifests = {index: _read_part(parts_dir / str(index), index) for index in found}
    first = manifests[found[0]]
    parts = first["part"]["of"]
    for index, manifest in manifests.items():
        if manifest["part"]["of"] != parts:
            raise UserError(f"part {index} is part of {manifest['part']['of']}, part {found[0]} of {parts}")
        if manifest["source"].get("spec") != first["source"].get("spec"):
            raise UserError(f"part {index} was prepared from {manifest['source'].get('spec')!r}, not from "
                            f"{first['source'].get('spec')!r}")  # fmt: skip
        differing = [k for k in SHARED if manifest.get(k) != first.get(k)]
        if differing:
            raise UserError(f"part {index} differs from part {found[0]} in {', '.join(differing)}")
    missing = sorted(set(range(parts)) - set(found))
    if missing:
        raise UserError(f"{parts_dir}: part(s) {', '.join(map(str, missing))} of {parts} missing or incomplete")
    extra = sorted(set(found) - set(range(parts)))
    if extra:
        raise UserError(f"{parts_dir}: part(s) {', '.join(map(str, extra))} beyond the {parts} parts")

    splits: dict[str, dict] = {}
    rejects: list[str] = []
    for index in range(parts):
        manifest = manifests[index]
        for split, listing in manifest["splits"].items():
            merged = splits.setdefault(split, {"count": 0, "shards": []})
            for shard in listing["shards"]:
                merged["count"] += shard["count"]
                shard = dict(shard, name=f"parts/{index}/{shard['name']}")
                if shard.get("index"):
                    shard["index"] = dict(shard["index"], name=f"parts/{index}/{shard['index']['name']}")
                merged["shards"].append(shard)
        rejected = parts_dir / str(index) / REJECTS_NAME
        if rejected.is_file():
            rejects += [line for line in rejected.read_text().splitlines() if line.strip()]
    classes = [m["labels"]["num_classes"] for m in manifests.values() if m.get("labels")]
    merged = {k: v for k, v in first.items() if not k.startswith("_") and k != "part"}
    merged |= {
        "created_unix": int(time.time()),
        "source": first["source"] | {"used_items": sum(m["source"]["used_items"] for m in manifests.values())},
        "labels": {"num_classes": max(classes), "class_names": _class_names(manifests.values(), max(classes))}
        if classes
        else None,
        "count": sum(s["count"] for s in splits.values()),
        "rejects": sum(m.get("rejects", 0) for m in manifests.values()),
        "splits": splits,
        "parts": parts,
    }
    merged["source"].pop("part", None)
    if rejects:
        write_bytes_atomic(out_dir / REJECTS_NAME, ("\n".join(rejects) + "\n").encode())
    else:
        (out_dir / REJECTS_NAME).unlink(missing_ok=True)
    write_json_atomic(out_dir / MANIFEST_NAME, merged)  # last: a manifest names complete parts only
    seconds = time.perf_counter() - started
    return PrepareSummary(merged["count"], merged["rejects"], seconds, splits, str(out_dir))


def _read_part(folder: Path, index: int) -> dict:
    """A part's manifest, checked against its folder: every shard and index there, at its size."""
    try:
        manifest = load_manifest(folder)
    except UserError as exc:
        raise UserError(f"part {index} is incomplete or damaged: {exc}") from None
    stamp = manifest.get("part")
    if not isinstance(stamp, dict) or stamp.get("index") != index or not isinstance(stamp.get("of"), int):
        raise UserError(f"part {index}: {folder / MANIFEST_NAME} is not the manifest of part {index} ({stamp=})")
    # What the merge reads beyond the manifest's common fields (load_manifest checked those).
    what = f"part {index} is damaged: {folder / MANIFEST_NAME}"
    require_fields(manifest, {"source": dict}, what)
    require_fields(manifest["source"], {"used_items": int}, what)
    if manifest.get("labels") is not None:
        require_fields(manifest["labels"] if isinstance(manifest["labels"], dict) else {}, {"num_classes": int}, what)
    for listing in manifest["splits"].values():
        for shard in listing["shards"]:
            path = folder / shard["name"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard.get("bytes"):
                found = "missing" if size is None else f"{size} bytes, not {shard.get('bytes')}"
                raise UserError(f"part {index} is damaged: {path} {found}")
            index_entry = shard.get("index")
            if index_entry and not (isinstance(index_entry, dict) and isinstance(index_entry.get("name"), str)):
                raise UserError(f"{what}: shard {shard['name']} has a malformed index entry")
            if index_entry and not (folder / index_entry["name"]).is_file():
                raise UserError(f"part {index} is damaged: {folder / shard['index']['name']} missing")
    return manifest


def _class_names(manifests, count: int) -> list[str]:
    """The longest list of class names among the parts (a part may not have seen every class)."""
    named = [m["labels"].get("class_names") or [] for m in manifests if m.get("labels")]
    longest = max(named, key=len)
    return longest if len(longest) == count else [*longest, *map(str, range(len(longest), count))]


def describe(summary: PrepareSummary) -> str:
    return summary.line().replace("prepared", "merged", 1)

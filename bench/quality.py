"""Sample quality against training time: FID and KID at n = 2000 vs MNIST test digits.

Trains a config exactly as the quickstart does (the deepspeed launcher, 2 CPU ranks by
default), keeping a checkpoint every --eval-every steps, then scores each checkpoint's
sampling generator (EMA when on): 2000 generated digits against the first 2000 MNIST
*test* digits. In the same run it measures the floor at the same n: 2000 real *training*
digits against the same 2000 test digits. A model cannot be expected to beat that floor;
FID/floor says how far from real the samples are.

The train-minutes column is wall time from the launch to the checkpoint (start-up and
checkpoint writes included: what a user waits), on this machine with every core busy.

    python bench/quality.py                                       # configs/mnist32.yaml
    python bench/quality.py --config configs/mnist32_mlp.yaml --eval-every 4690
    python bench/quality.py --label lr4e-4 train.g_optim.lr=4e-4  # one lever changed
    python bench/quality.py --train-images 1000 --label diffaugment 'train.augment=[translation,cutout,color]'

--train-images N trains on the first N training digits only (the floor still uses 2000).
A class-conditional config (configs/mnist32_cond.yaml) is also scored on class accuracy: a digit
classifier is trained here on the training digits (its test accuracy is reported beside it,
bench/digit_classifier.py) and judges 2000 class-balanced generated digits.

Prints a table (step, train minutes, FID, KID, FID/floor, precision, recall) and ends with one JSON line;
--out appends that line to a JSON-lines file (docs/lab-log.md, "Sample quality", is built from one).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digit_classifier import class_accuracy, train_classifier
from harness import PlainLoop, report

from pipeline.checkpoint import read_meta
from pipeline.config import load_config
from pipeline.evaluation.fid import ReferenceSource, compare, generated_stats, reference_stats
from pipeline.evaluation.inception import InceptionFeatures
from pipeline.export import load_generator

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"  # the quickstart's shards: mnist32/ (training digits), mnist32_test/


class RunningStatistics(nn.Module):
    """A generator sampled with BatchNorm's running statistics (eval mode) instead of the
    batch statistics that pipeline.export.generate uses: the BN lever of the recipe."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator, self.latent_dim, self.num_classes = generator, generator.latent_dim, generator.num_classes

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(z, labels)


def data_folders(root: Path) -> tuple[Path, Path]:
    """(training digits, test digits) under a data root."""
    return root / "mnist32", root / "mnist32_test"


def ensure_data(root: Path, train_images: int | None = None) -> Path | None:
    """The 32x32 MNIST shards of both subsets (prepared once, as the quickstart does), and of
    the first `train_images` training digits if asked (returned)."""
    wanted = [*zip(data_folders(root), ("mnist:train", "mnist:test"), (None, None), strict=True)]
    limited = root / f"mnist32_first{train_images}" if train_images else None
    if limited:
        wanted.append((limited, "mnist:train", train_images))
    for out, source, limit in wanted:
        if not (out / "manifest.json").exists():
            prepare = [sys.executable, "-m", "pipeline", "prepare", source, str(out), "--resolution", "32"]
            prepare += ["--channels", "1", "--no-progress", *(["--limit", str(limit)] if limit else [])]
            subprocess.run(prepare, check=True, cwd=REPO)
    return limited


def train(config: str, ranks: int, steps: int, eval_every: int, run_root: Path, overrides: list[str]) -> tuple:
    """Train through launch/single_node.sh; (run folder, seconds from launch to each checkpoint)."""
    name = "quality"
    shutil.rmtree(run_root / name, ignore_errors=True)
    command = ["bash", "launch/single_node.sh", "--gpus", str(ranks), config]
    command += [
        f"train.steps={steps}",
        f"train.checkpoint_every={eval_every}",
        f"train.keep_checkpoints={steps // eval_every + 1}",
        f"train.run_root={run_root}",
        f"train.run_name={name}",
        "eval.fid_every=0",  # scored afterwards, so that evaluation does not count as training time
        "tracking.enabled=false",
        *overrides,
    ]
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    run_dir = run_root / name
    checkpoints = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    return run_dir, [(p, (p / "meta.json").stat().st_mtime - started) for p in checkpoints]


def train_plain(config, steps: int, eval_every: int, run_root: Path, training_digits: Path) -> tuple:
    """The reference: the plain loop (harness.PlainLoop, after pytorch/examples' dcgan/main.py)
    on the same models, data, batch (world x batch_per_rank), optimisers and seed, in one
    process with no DeepSpeed, no loader and no EMA. If our pipeline scores far worse than
    this, the fault is ours, not the recipe's."""
    from pipeline.export import save_generator
    from pipeline.images import from_uint8

    run_dir = run_root / "plain"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "exports").mkdir(parents=True)
    started = time.time()
    source = ReferenceSource(str(training_digits))
    images = torch.stack([image for _, batch in source.batches(source.count(None), 1000) for image in batch])
    loop = PlainLoop(config, torch.device("cpu"))
    batch = config.data.batch_per_rank * 2  # the quickstart's 2 ranks
    order, cursor, exports = torch.randperm(len(images)), 0, []
    for step in range(1, steps + 1):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(images)), 0
        loop.step(from_uint8(images[order[cursor : cursor + batch]]))
        cursor += batch
        if step % eval_every == 0 or step == steps:
            path = save_generator(run_dir / "exports" / f"step_{step:07d}.pt", loop.g, config.model, step, ema=False)
            exports.append((path, time.time() - started))
        if step % 100 == 0 or step == steps:
            seconds = time.time() - started
            eta = (steps - step) * seconds / step
            print(f"plain loop: step {step}/{steps}, {step / seconds:.1f} step/s, ETA {eta:.0f} s", flush=True)
    return run_dir, exports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist32.yaml")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (the quickstart uses 2)")
    parser.add_argument("--steps", type=int, help="default: the config's train.steps")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--n", type=int, default=2000, help="generated and reference images per FID")
    parser.add_argument("--run-root", default="runs/bench-quality")
    parser.add_argument("--data-root", type=Path, default=DATA, help="where mnist32/ and mnist32_test/ are (or go)")
    parser.add_argument("--label", default=None, help="name of this row in the JSON (default: the overrides)")
    parser.add_argument("--out", help="append the JSON line to this file")
    parser.add_argument("--score-only", help="score the checkpoints of this run folder instead of training")
    parser.add_argument(
        "--variants",
        default="sampler",
        help="comma-separated generators scored at each checkpoint: sampler (what sample/eval use: "
        "the EMA when on), raw (the trained G), raw-running (raw G with BatchNorm's running statistics)",
    )
    parser.add_argument("--steps-scored", help="comma-separated steps to score (default: every checkpoint)")
    parser.add_argument("--plain", action="store_true", help="train with the plain PyTorch loop instead")
    parser.add_argument("--train-images", type=int, help="train on the first N training digits only")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    limited = ensure_data(args.data_root, args.train_images)
    train_digits, test_digits = data_folders(args.data_root)
    data = [f"data.shards={limited or train_digits}"]  # the digits under --data-root, whatever the config names
    config = load_config(REPO / args.config, data + args.overrides)
    steps = args.steps or config.train.steps
    if args.plain:
        run_dir, checkpoints = train_plain(config, steps, args.eval_every, REPO / args.run_root, train_digits)
    elif args.score_only:
        run_dir = Path(args.score_only)
        checkpoints = [(p, None) for p in sorted((run_dir / "checkpoints").glob("step_*")) if p.is_dir()]
    else:
        run_dir, checkpoints = train(
            args.config, args.ranks, steps, args.eval_every, REPO / args.run_root, data + args.overrides
        )

    ev = config.eval
    extractor = InceptionFeatures(
        torch.device("cpu"), ev.inception_weights, ev.allow_nonstandard_weights, ev.inception_classifier
    )
    kid_args = (ev.kid_subsets, min(ev.kid_subset_size, args.n), ev.seed, ev.prdc_k)

    def stats(path: Path):
        return reference_stats(extractor, ReferenceSource(str(path)), args.n, ev.batch_size, progress=True)

    test = stats(test_digits)
    floor = compare(stats(train_digits), test, extractor, *kid_args)
    judge, judge_accuracy = None, None
    if config.model.conditional:  # class accuracy needs a judge: trained here, on the training digits
        judge, judge_accuracy = train_classifier(train_digits, test_digits)
        print(f"digit classifier: {judge_accuracy:.2%} on the test digits", flush=True)
    wanted = {int(s) for s in args.steps_scored.split(",")} if args.steps_scored else None
    rows = []
    for path, seconds in checkpoints:
        for variant in args.variants.split(","):
            generator, payload = load_generator(path, prefer_ema=variant == "sampler")
            if wanted is not None and payload["step"] not in wanted:
                break  # read once to learn the step, not again to score it
            if variant == "raw-running":
                generator = RunningStatistics(generator)
            generated = generated_stats(extractor, generator, args.n, ev.batch_size, ev.seed)
            scored = compare(generated, test, extractor, *kid_args, ev.is_splits)
            rows.append(
                {
                    "step": payload["step"],
                    "variant": variant,
                    "train_min": None if seconds is None else round(seconds / 60, 2),
                    "fid": round(scored["fid"], 2),
                    "kid": round(scored["kid"], 5),
                    "fid_over_floor": round(scored["fid"] / floor["fid"], 2),
                    **{name: round(scored[name], 4) for name in ("precision", "recall", "density", "coverage")},
                    **{
                        name: round(scored[name], 3)
                        for name in ("inception_score", "inception_score_std")
                        if name in scored
                    },
                    "ema": payload["ema"],
                }
            )
            if judge is not None:
                rows[-1]["class_accuracy"], rows[-1]["class_accuracy_per_class"] = class_accuracy(
                    judge, generator, args.n, ev.seed
                )
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nfloor (n={args.n} train vs {args.n} test): FID {floor['fid']:.2f}  KID {floor['kid']:.5f}")
    print(f"floor precision {floor['precision']:.3f} recall {floor['recall']:.3f}")
    print(f"{'step':>6} {'variant':>11} {'train min':>9} {'FID':>7} {'KID':>8} {'FID/floor':>9} {'P':>6} {'R':>6}")
    for r in rows:
        minutes = "-" if r["train_min"] is None else f"{r['train_min']:.2f}"
        scores = f"{r['fid']:>7.2f} {r['kid']:>8.5f} {r['fid_over_floor']:>9.2f}"
        accuracy = f" class accuracy {r['class_accuracy']:.2%}" if "class_accuracy" in r else ""
        print(
            f"{r['step']:>6} {r['variant']:>11} {minutes:>9} {scores} {r['precision']:>6.3f} {r['recall']:>6.3f}"
            + accuracy
        )
    final = next(r for r in reversed(rows) if r["variant"] == rows[0]["variant"])
    label = args.label or (" ".join(args.overrides) or "as shipped")
    world_size = 1 if args.plain else read_meta(checkpoints[-1][0])["world_size"]
    report(
        "quality",
        {
            "fid": final["fid"],
            "kid": final["kid"],
            "train_min": final["train_min"],
            "step": final["step"],
            **{name: final[name] for name in ("precision", "recall", "density", "coverage")},
            **({"class_accuracy": final["class_accuracy"]} if judge is not None else {}),
            "rows": rows,
        },
        {
            "floor_fid": round(floor["fid"], 2),
            "floor_kid": round(floor["kid"], 5),
            **{f"floor_{name}": round(floor[name], 4) for name in ("precision", "recall", "density", "coverage")},
            "n": args.n,
            **({"classifier_test_accuracy": round(judge_accuracy, 4)} if judge is not None else {}),
        },
        final["fid"] / floor["fid"],
        config=args.config,
        label=label,
        ranks=args.ranks,
        world_size=world_size,
        train_images=args.train_images,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(
                json.dumps({"label": label, "config": args.config, "floor": round(floor["fid"], 2), "rows": rows})
                + "\n"
            )


if __name__ == "__main__":
    main()

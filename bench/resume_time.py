"""Time to resume the 64x64 DCGAN pair (ZeRO-1, bf16 on CPU) on the same and on another world
size, and the checkpoint's size.

A 2-rank run (torchrun, gloo) trains 2 steps and checkpoints. Then, from that checkpoint:
same size (2 ranks), and 1 rank twice: the first converts the ZeRO partitions to DeepSpeed's
universal layout (kept beside the checkpoint), the second reuses it. Each figure is one
rank-0 process's time from its start (psutil create_time) to the end of its first step:
imports, process group, engines, loading, loader start and one step. The baseline is the
same-size resume; the ratio is changed-size (converted already) / same-size.

    python bench/resume_time.py [--images 512]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def overrides(shards: Path, root: Path, steps: int) -> list[str]:
    return [
        f"data.shards={shards}",
        "data.batch_per_rank=16",
        "data.workers=1",
        "deepspeed.precision=bf16",
        "deepspeed.zero_stage=1",
        "train.device=cpu",
        f"train.run_root={root}",
        "train.run_name=resume",
        f"train.steps={steps}",
        "train.progress=false",
        "train.log_every=1",
        "train.sample_every=1000",
        "tracking.enabled=false",
        "eval.fid_every=0",
    ]


def job(args) -> None:
    """One rank of a launch: build (and resume) the trainer as `pipeline train` does, run the
    steps; rank 0 writes its timings."""
    import psutil

    started = psutil.Process().create_time()
    from pipeline import engines
    from pipeline.config import load_config
    from pipeline.dist import detect, teardown
    from pipeline.run import build_trainer

    info = detect("cpu")
    engines.init_distributed(info, 5)
    config = load_config(REPO / "configs/celeba64.yaml", args.overrides)
    run_dir = Path(config.train.run_root) / config.train.run_name
    checkpoint = Path(args.resume) if args.resume else None
    trainer, _ = build_trainer(config, info, run_dir, checkpoint)
    built = time.time()
    batches = trainer.loader.forever()
    trainer.train_step(batches)
    trainer.read_metrics()  # waits for the step
    first_step = time.time()
    while trainer.global_step < config.train.steps:
        trainer.train_step(batches)
    if args.save:
        trainer.save_checkpoint()
    batches.close()
    if info.rank == 0:
        record = {"to_trainer_s": built - started, "to_first_step_s": first_step - started}
        Path(args.job).write_text(json.dumps(record))
    teardown()


def launch(world: int, out: Path, job_overrides: list[str], resume: Path | None = None, save=False) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    command += [
        __file__,
        "--job",
        str(out),
        *(["--resume", str(resume)] if resume else []),
        *(["--save"] if save else []),
    ]
    done = subprocess.run([*command, *job_overrides], capture_output=True, text=True, timeout=900, cwd=REPO)
    if done.returncode:
        sys.exit(f"launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def folder_mb(path: Path, skip: str = "") -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not (skip and skip in f.parts)) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--resume", help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.job:
        args.overrides = rest
        return job(args)

    from harness import mnist_shards, report

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mnist_shards(tmp / "shards", 64, 3, limit=args.images)
        print("training 2 steps on 2 ranks, then resuming from that checkpoint", flush=True)
        launch(2, tmp / "first.json", overrides(tmp / "shards", tmp / "runs", 2), save=True)
        checkpoint = tmp / "runs/resume/checkpoints/step_0000002"
        resumed = overrides(tmp / "shards", tmp / "runs", 3)
        figures = {
            "same_size_2_to_2_s": launch(2, tmp / "same.json", resumed, checkpoint)["to_first_step_s"],
            "changed_2_to_1_converting_s": launch(1, tmp / "conv.json", resumed, checkpoint)["to_first_step_s"],
            "changed_2_to_1_converted_s": launch(1, tmp / "again.json", resumed, checkpoint)["to_first_step_s"],
            "checkpoint_mb": folder_mb(checkpoint, skip="universal"),
            "universal_copy_mb": folder_mb(checkpoint / "g" / "universal") + folder_mb(checkpoint / "d" / "universal"),
        }
    figures = {k: round(v, 2) for k, v in figures.items()}
    for name, value in figures.items():
        print(f"{name:>30}: {value}")
    report(
        "resume_time",
        figures,
        {"what": "same-size resume (2 ranks -> 2), process start to the end of the first step"},
        round(figures["changed_2_to_1_converted_s"] / figures["same_size_2_to_2_s"], 3),
        ratio_is="changed-size resume (universal copy already made) / same-size resume",
        model="DCGAN 64x64 RGB, widths 64, ZeRO-1 bf16, CPU gloo",
    )


if __name__ == "__main__":
    main()

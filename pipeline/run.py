"""A training run, wired: the run folder, the tracker, the Trainer and its reporters.

    python -m pipeline train --config configs/mnist32.yaml                     # one process
    deepspeed --num_gpus 2 --module pipeline train --config configs/mnist32.yaml
    torchrun --nproc_per_node 2 -m pipeline train --config configs/mnist32.yaml

Which ranks run it: every rank runs `run_training`. Rank 0 settles the run folder and checks
the tracking store before any training work, and alone records (RunRecords, the tracker);
every rank evaluates FID, a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import types
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from pipeline import engines
from pipeline.checkpoint import latest_checkpoint, read_meta, work_in
from pipeline.config import Config
from pipeline.dist import DistInfo
from pipeline.errors import Preempted, UserError
from pipeline.reporting.fid_scores import FidScores
from pipeline.reporting.model_log import ModelLog
from pipeline.reporting.run_records import RunRecords
from pipeline.resize import plan_resize, resized_config
from pipeline.tracking import NullTracker, make_tracker
from pipeline.tracking.describe import Resumption, describe_run, open_run, training_dataset
from pipeline.tracking.system_metrics import sampler_node, start_node_sampler
from pipeline.train import Trainer
from pipeline.versions import versions

log = logging.getLogger("pipeline.train")


def resolve_run(config: Config, config_name: str, resume: str) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from). Rank 0 decides; run_training broadcasts it.

    --resume none: a new run; refused if the folder already holds checkpoints (never
    overwrite a run). auto: the newest complete checkpoint of the run folder, or a fresh
    start when there is none (a stable train.run_name is required). PATH: that checkpoint,
    continuing in the run folder that holds it."""
    train = config.train
    if resume not in ("none", "auto"):
        path = Path(resume)
        if path.name == "latest" and path.is_file():  # checkpoints/latest: the checkpoint it names
            path = path.parent / path.read_text().strip()
        if (path / "checkpoints").is_dir():  # a run folder: its newest complete checkpoint
            path = latest_checkpoint(path)
            if path is None:
                raise UserError(f"--resume {resume}: the run folder holds no complete checkpoint")
        read_meta(path)
        return path.parent.parent, path
    if resume == "auto" and not train.run_name:
        raise UserError(
            "--resume auto needs a stable run folder: set train.run_name (slurm/train.sbatch uses the job name)"
        )
    name = train.run_name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = Path(train.run_root) / name
    work = work_in(run_dir)
    if resume == "none" and work:
        raise UserError(
            f"run folder {run_dir} already holds a run's work ({', '.join(work)}); pass --resume auto to "
            "continue it, or choose another train.run_name"
        )
    return run_dir, latest_checkpoint(run_dir)


@contextlib.contextmanager
def run_log(run_dir: Path, is_main: bool):
    """Rank 0: the `pipeline` loggers also write to RUN/train.log while the block runs."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def removed_if_set_up_fails(run_dir: Path, is_main: bool):
    """Rank 0: a run folder this start creates is removed again when the start fails before its
    first step (a UserError in set-up: a missing FID reference, a checkpoint that does not
    fit): it would hold no run, only its train.log, and stand in the way of the next start as
    a folder that "holds work". The error itself is on stderr. Set `.done` once set up."""
    state = types.SimpleNamespace(done=False)
    new = is_main and not run_dir.exists()
    try:
        yield state
    except UserError:
        if new and not state.done:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def build_trainer(config: Config, info: DistInfo, run_dir: Path, checkpoint: Path | None, reporters=()):
    """All ranks: (the trainer, its Resumption or None), resumed from `checkpoint` when one is
    given, on this world size whatever the checkpoint's (pipeline/resize.py)."""
    if checkpoint is None:
        return Trainer(config, info, run_dir, reporters), None
    meta = read_meta(checkpoint)
    resize = plan_resize(meta, config, info.world_size)
    if resize is not None:
        config = resized_config(config, resize)
    trainer = Trainer(config, info, run_dir, reporters, resized=resize is not None)
    trainer.resume(checkpoint, meta)
    step = trainer.global_step
    if info.is_main:
        log.info("resumed from %s at step %d (epoch %s)", checkpoint, step, meta.get("epoch", "?"))
        if resize is not None:
            log.info(resize.describe(step))
    for reporter in reporters:
        reporter.on_resume(step)
    return trainer, Resumption(meta.get("tracking_run_id"), step, resize.describe(step) if resize else None)


def run_reporters(config: Config, info: DistInfo, run_dir: Path, tracker) -> tuple[list, FidScores | None]:
    """Every rank's reporters (and the FID one): rank 0's records and model log; FID on every
    rank when it is on."""
    fid = None
    if config.eval.fid_every:
        from pipeline.evaluation.fid import FidEvaluator

        evaluator = FidEvaluator(config, info.device, config.train.progress)
        fid = FidScores(evaluator, config, run_dir, info.is_main)
    if not info.is_main:
        return ([fid] if fid else []), fid
    model_log = ModelLog(tracker)
    if fid is not None:
        fid.tracker, fid.model_log = tracker, model_log
    return [r for r in (RunRecords(run_dir, config, tracker), fid, model_log) if r is not None], fid


def start_tracking(trainer: Trainer, tracker, run_dir: Path, resumed, overrides, config_name, fid) -> None:
    """Rank 0: the run described to the tracker (the checkpoint's run when resuming); the
    checkpoints carry its id from then on."""
    config, info = trainer.config, trainer.info
    ds_configs = {"g": trainer.g_engine.ds_config, "d": trainer.d_engine.ds_config}
    description = describe_run(
        config, info, run_dir, ds_configs, training_dataset(config, trainer.loader), trainer.loader.manifest,
        versions(), fid.setup() if fid is not None else None, overrides, config_name,
    )  # fmt: skip
    open_run(tracker, description, info.world_size, sampler_node(config.tracking, info), resumed)
    trainer.checkpointer.run_meta = {"tracking_run_id": tracker.run_id}


def run_training(config: Config, config_name: str, resume: str = "none", overrides: list[str] | None = None) -> int:
    """Entry of `pipeline train` on every rank. A problem with the run folder or the tracking
    store, found by rank 0, stops every rank before any training work."""
    from pipeline.dist import detect

    info = detect(config.train.device)
    log.info(info.mapping())
    if info.is_main:
        log.info("topology: %s", info.summary())
    engines.init_distributed(info, config.deepspeed.timeout_minutes)
    decision: list = [None]
    tracker = NullTracker()
    if info.is_main:
        try:
            decision = [resolve_run(config, config_name, resume)]
            tracker = make_tracker(config.tracking, config.train.run_root, info.is_main)
        except UserError as exc:
            decision = [exc]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], UserError):
        raise decision[0]
    run_dir, checkpoint = decision[0]
    with removed_if_set_up_fails(run_dir, info.is_main) as set_up, run_log(run_dir, info.is_main):
        reporters, fid = run_reporters(config, info, run_dir, tracker)
        trainer, resumed = build_trainer(config, info, run_dir, checkpoint, reporters)
        if info.is_main:
            reporters[0].write_setup(trainer)
            start_tracking(trainer, tracker, run_dir, resumed, overrides, config_name, fid)
        set_up.done = True
        sampler = start_node_sampler(config.tracking, info, tracker)
        try:  # the tracker's end state; the CLI's teardown destroys the process group on every path
            metrics = trainer.train()
        except Preempted:
            tracker.finish("KILLED")
            raise
        except BaseException as exc:
            tracker.finish("FAILED", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if sampler is not None:
                sampler.finish()
        tracker.finish("FINISHED")
    if info.is_main:
        report_end(trainer, tracker, run_dir, metrics, fid)
    dist.barrier()  # every rank is past its last collective before rank 0 (the rendezvous store) ends
    return 0


def report_end(trainer: Trainer, tracker, run_dir: Path, metrics: dict, fid: FidScores | None) -> None:
    """Rank 0: where to see the run, a JSON summary line, and the FID verdict."""
    if tracker.where():
        log.info(tracker.where())
    losses = {k: metrics.get(k) for k in ("loss_D", "loss_G", "D_x", "D_G_z")}
    summary = {"run_dir": str(run_dir), "step": trainer.global_step, "mlflow_run_id": tracker.run_id, **losses}
    print(json.dumps(summary))
    if fid is not None and fid.last is not None:
        from pipeline.evaluation.fid import verdict

        print(f"step {trainer.global_step}: {verdict(fid.last)}")

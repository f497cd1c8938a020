"""Run by torchrun in test_elastic.py: one segment of a run (any world size), resumed from the
run folder's newest checkpoint exactly as `pipeline train --resume auto` builds its trainer
(build_trainer), trained to train.steps and checkpointed. Rank 0 writes what the test needs
and the CLI does not show: the sample keys every rank was given, per-step losses, and the
Adam step counts of both optimizers as loaded and at the end."""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import engines
from pipeline.checkpoint import latest_checkpoint
from pipeline.config import load_config
from pipeline.dist import detect, teardown
from pipeline.run import build_trainer
from tests.conftest import allow_cpu_fp16, step_losses

if os.environ.get("PIPELINE_TEST_CPU_FP16") == "1":  # the cpu_fp16 fixture, for this process
    allow_cpu_fp16()

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()

info = detect("cpu")
engines.init_distributed(info, 2)
config = load_config(None, args.overrides)
run_dir = Path(config.train.run_root) / config.train.run_name
checkpoint = latest_checkpoint(run_dir)
trainer, _ = build_trainer(config, info, run_dir, checkpoint)


def matches_checkpoint(module, file) -> bool:
    """Whether the module's weights and buffers are those the checkpoint's fp32 file holds."""
    saved = torch.load(file, map_location="cpu", weights_only=True)
    saved = saved.get("model", saved)  # ema.pt nests its state dict
    return all(torch.equal(value.float(), saved[name].float()) for name, value in module.state_dict().items())


def adam_steps(engine) -> int:
    """Adam's step count as the optimizer holds it (under DeepSpeed's ZeRO/bf16 wrapper, if any)."""
    optimizer = engine.engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    return int(next(iter(base.state.values()), {"step": 0})["step"])  # no state before a first applied update


def scaler_state() -> dict:
    """Each engine's (loss scale, skipped updates): None and a count outside fp16."""
    return {
        "g": [trainer.g_engine.loss_scale, trainer.g_engine.skipped_steps],
        "d": [trainer.d_engine.loss_scale, trainer.d_engine.skipped_steps],
    }


loaded = None
if checkpoint is not None:
    loaded = {
        "adam_steps": {"g": adam_steps(trainer.g_engine), "d": adam_steps(trainer.d_engine)},
        "g": matches_checkpoint(trainer.g_engine.module, checkpoint / "g_weights.pt"),
        "d": matches_checkpoint(trainer.d_engine.module, checkpoint / "d_weights.pt"),
        "ema": matches_checkpoint(trainer.ema.model, checkpoint / "ema.pt"),
        "scaler": scaler_state(),
    }
start, keys = trainer.global_step, []
batches = (keys.append(batch.keys) or batch for batch in trainer.loader.forever())
losses = step_losses(trainer, batches, config.train.steps - start)
trainer.save_checkpoint()
batches.close()  # stops the loader workers
every_rank = [None] * info.world_size
dist.all_gather_object(every_rank, keys)
if info.rank == 0:
    record = {
        "world_size": info.world_size,
        "start_step": start,
        "batch_per_rank": trainer.config.data.batch_per_rank,
        "accumulation": trainer.config.deepspeed.gradient_accumulation,
        "keys": every_rank,
        "losses": losses,
        "loaded": loaded,
        "adam_steps_at_end": {"g": adam_steps(trainer.g_engine), "d": adam_steps(trainer.d_engine)},
        "scaler_at_end": scaler_state(),
        "loader": trainer.loader.state_dict(),
    }
    Path(args.out).write_text(json.dumps(record))
dist.barrier()
trainer = None  # the engines and their process groups go first, as run_training's do (dist.teardown)
assert teardown(), "the process group did not shut down"

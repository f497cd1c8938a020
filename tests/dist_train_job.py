"""Run by the deepspeed launcher in test_train_distributed.py (2 CPU ranks, gloo).

Checks what only a real multi-rank job shows: each rank computes a different loss on its own
data, yet after DeepSpeed's backward the gradients are identical on every rank, and after
training steps G, D and the EMA weights are identical too. Rank 0 writes the evidence."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import engines, losses
from pipeline.config import load_config
from pipeline.dist import detect, teardown
from pipeline.images import from_uint8
from pipeline.reporting.run_records import RunRecords
from pipeline.run import start_tracking
from pipeline.tracking import make_tracker
from pipeline.train import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("overrides", nargs="*")
parser.add_argument("--local_rank", type=int)  # the deepspeed launcher passes it
args = parser.parse_args()

info = detect("cpu")
engines.init_distributed(info, 2)
config = load_config(None, args.overrides)
tracker = make_tracker(config.tracking, config.train.run_root, info.is_main)  # rank 0 only
run_dir = Path(config.train.run_root) / "dist"
trainer = Trainer(config, info, run_dir)
if info.is_main:  # as run_training does: the set-up files first, then the run described to the tracker
    RunRecords(run_dir, config, tracker).write_setup(trainer)
    start_tracking(trainer, tracker, run_dir, None, [], None, None)
batches = trainer.loader.forever()


def gather(value):
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


# One D micro-step by hand, to look at the gradients between backward and step.
real = from_uint8(next(batches).images)
with torch.no_grad():
    fake = trainer.g_engine.module(*trainer.latents(real.shape[0]))  # (z, None): unconditional
loss = losses.d_loss("nonsaturating", trainer.d_engine(real), trainer.d_engine(fake))
trainer.d_engine.backward(loss)
grads = torch.cat([p.grad.flatten() for p in trainer.d_engine.module.parameters()])
evidence = {"d_losses": gather(loss.item()), "d_grads": gather(grads.tolist())}
trainer.d_engine.step()

history = []
for _ in range(2):
    trainer.train_step(batches)
    history.append(trainer.read_metrics())  # a logging step: reduced over the ranks
flat = lambda module: torch.cat([p.detach().float().flatten() for p in module.parameters()]).tolist()  # noqa: E731
evidence |= {
    "g": gather(flat(trainer.g_engine.module)),
    "d": gather(flat(trainer.d_engine.module)),
    "ema": gather(flat(trainer.ema.model)),
    "losses": gather([(m["loss_D"], m["loss_G"]) for m in history]),
    "world_size": info.world_size,
    "launcher": info.launcher,
    "tracker": gather(type(tracker).__name__),
}
tracker.finish("FINISHED")
batches.close()  # stops the loader workers
if info.rank == 0:
    with open(args.out, "w") as f:
        json.dump(evidence, f)
dist.barrier()
trainer = None  # the engines and their process groups go first, as run_training's do (dist.teardown)
assert teardown(), "the process group did not shut down"  # the CLI's own clean end

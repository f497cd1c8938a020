"""Resuming a run on another world size: how the batch is split, and what carries over.

Which ranks run it: every rank, on the same checkpoint meta and config, before the trainer is
built (the split decides the loader's batch and the engines' accumulation), so every rank
reaches the same answer without talking to the others.

What carries over exactly: weights, optimizer state (ZeRO partitions are re-split by DeepSpeed,
see pipeline/engines.py), the fp16 loss scale, the EMA, the step counter and the data position
(pipeline/data/loader.py plans the rest of the epoch for the new ranks). What cannot: each
rank's random stream belongs to a rank that may not exist any more, so every rank's stream is
derived again from (seed, step, new rank); the run is then exact from that point on, but not
bit-identical to a run that never changed size.

The global batch (world x batch per rank x gradient accumulation):
- train.elastic_batch: global (default) keeps it. Each rank takes the largest batch that
  divides global / world and is no larger than the checkpoint's batch per rank (which is
  known to fit in memory), and accumulates the rest. When global / world is not whole, the
  resume is refused with the numbers.
- train.elastic_batch: per_rank keeps the config's batch per rank and accumulation; the global
  batch changes with the world size and the run's log says so. The learning rate then no
  longer matches the batch: for Adam, the square-root rule (lr x sqrt(new / old)) is the usual
  starting point (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms", NeurIPS 2022); set train.g_optim.lr / d_optim.lr accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.errors import UserError


@dataclass(frozen=True)
class Split:
    world_size: int
    batch_per_rank: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_per_rank * self.accumulation

    def words(self) -> str:
        return f"{self.global_batch} (batch {self.batch_per_rank} x accumulation {self.accumulation})"


@dataclass(frozen=True)
class Resize:
    """A resume on another world size: the checkpoint's split and the new one."""

    old: Split
    new: Split

    def describe(self, step: int) -> str:
        kept = self.old.global_batch == self.new.global_batch
        batch = (
            f"global batch kept at {self.new.words()}"
            if kept
            else f"global batch {self.old.global_batch} -> {self.new.words()} (train.elastic_batch: per_rank)"
        )
        return f"resumed from step {step}: world size {self.old.world_size} -> {self.new.world_size}, {batch}"


def saved_split(meta: dict) -> Split:
    saved = meta["config"]
    return Split(meta["world_size"], saved["data"]["batch_per_rank"], saved["deepspeed"]["gradient_accumulation"])


def plan_resize(meta: dict, config: Config, world_size: int) -> Resize | None:
    """The new split for a checkpoint saved on another world size (None on the same one)."""
    old = saved_split(meta)
    if old.world_size == world_size:
        return None
    if config.train.elastic_batch == "per_rank":
        return Resize(old, Split(world_size, config.data.batch_per_rank, config.deepspeed.gradient_accumulation))
    if old.global_batch % world_size:
        keep = Split(world_size, config.data.batch_per_rank, config.deepspeed.gradient_accumulation)
        raise UserError(
            f"cannot keep the global batch {old.words()} on {old.world_size} ranks when resuming on {world_size}: "
            f"{old.global_batch} / {world_size} is not whole. Resume on a world size that divides "
            f"{old.global_batch}, or set train.elastic_batch=per_rank to train on with global batch "
            f"{keep.words()} on {world_size} ranks"
        )
    per_rank = old.global_batch // world_size
    batch = max(b for b in range(1, min(per_rank, old.batch_per_rank) + 1) if per_rank % b == 0)
    return Resize(old, Split(world_size, batch, per_rank // batch))


def resized_config(config: Config, resize: Resize) -> Config:
    """The config with the new split's batch per rank and accumulation."""
    data = config.data.model_copy(update={"batch_per_rank": resize.new.batch_per_rank})
    deepspeed = config.deepspeed.model_copy(update={"gradient_accumulation": resize.new.accumulation})
    return config.model_copy(update={"data": data, "deepspeed": deepspeed})

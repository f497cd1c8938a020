"""Run by torchrun in test_loader_distributed.py: each gloo rank streams its part of an
epoch and all-reduces once per batch, as a training step would. Rank 0 writes the result."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.loader import ShardedLoader
from pipeline.dist import teardown

shards, out_path = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
loader = ShardedLoader(DataConfig(shards=shards, batch_per_rank=4, workers=2, shuffle_window=8), 0, rank, world)
keys, steps = [], torch.zeros(1)
for batch in loader:
    total = batch.images.sum().reshape(1)
    dist.all_reduce(total)  # hangs (then times out) if one rank ran short
    steps += 1
    keys.extend(batch.keys)
gathered = [None] * world
dist.all_gather_object(gathered, {"rank": rank, "batches": int(steps.item()), "keys": keys})
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(gathered, f)
dist.barrier()
assert teardown(), "the process group did not shut down"  # the CLI's own clean end

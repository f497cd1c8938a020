"""Run by torchrun in test_fid.py (2 gloo ranks): the cross-rank reduction of FID/KID statistics.

Every rank holds a different, uneven share of one fixed feature set; after the reduction every
rank must hold the statistics, gathered rows, FID and KID of the whole set. Each rank writes
what it got, so the test compares both ranks with a 1-process computation."""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from pipeline.dist import teardown
from pipeline.evaluation.stats import FeatureStats, all_gather_rows, frechet_distance, kid

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
a = torch.from_numpy(np.random.default_rng(1).normal(size=(90, 16)))
b = torch.from_numpy(np.random.default_rng(2).normal(size=(70, 16)) * 1.2 + 0.3)
share = {0: slice(0, 37), 1: slice(37, 90)}[rank]  # uneven on purpose

stats = FeatureStats(16)
stats.update(a[share])
stats.reduce()
rows = all_gather_rows(a[share].float(), torch.arange(90)[share])
mu, sigma = stats.mean_cov()
ref = FeatureStats(16)
ref.update(b)
mu_b, sigma_b = ref.mean_cov()
result = {
    "n": stats.n,
    "mu": mu.tolist(),
    "sigma": sigma.tolist(),
    "rows": rows.tolist(),
    "fid": frechet_distance(mu, sigma, mu_b, sigma_b),
    "kid": kid(a.float(), b.float(), subsets=7, subset_size=30, seed=3),
}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
assert teardown(), "the process group did not shut down"  # the CLI's own clean end

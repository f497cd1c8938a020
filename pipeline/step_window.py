"""A logging window's step figures, kept on the device until a logging step reads them.

A value read back to the host (`.item()`, `.tolist()`, `float(tensor)`) makes the CPU wait
until the GPU has finished everything queued so far, so the next step cannot be queued
while this one runs. On one H100 a DCGAN step takes a few milliseconds, and a wait on
every step costs a large share of it. So, as nanoGPT's and torchtitan's training loops do,
the steps leave their losses, D outputs and gradient norms on the device, summed there, and
the trainer reads them back once every `train.log_every` steps: one all-reduce and one copy.
The logged values are the means over the steps since the previous record
(docs/training.md, "Metrics"). Two checks cannot wait for a logging step: stopping.py.

Which ranks: every rank keeps its own `StepMeans`; `StepMeans.read()` is a collective that
all ranks call at the same steps.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StepMeans:
    """Sums of per-step values over a logging window. Tensors are summed on their device; plain
    floats (DeepSpeed returns some gradient norms as floats) on the host, since moving a float
    to the GPU is itself a wait. A value that is None on a step (a gradient norm DeepSpeed did
    not measure) is left out of its mean."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.images, self.data_wait_s = 0, 0, 0.0
        self.excluded_s = 0.0  # checkpoints and evaluations in the window: not training
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of work between steps (checkpoints, FID evaluations, sample grids and
        records) out of the window's speed: the speed is the training steps'."""
        self.excluded_s += seconds

    def add(self, values: dict, images: int, data_wait_s: float) -> None:
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1
        self.images += images
        self.data_wait_s += data_wait_s

    def read(self, world_size: int) -> dict:
        """Collective. The means over the window's steps and all ranks, the window's speed, and a
        fresh window. Every rank gets the same values."""
        keys = sorted(self.sums)
        local = [torch.as_tensor(self.sums[k], dtype=torch.float64, device=self.device) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float64, device=self.device)
        packed = torch.cat([torch.stack(local), counts]) if keys else counts
        dist.all_reduce(packed)
        values = packed.tolist()  # the one copy to the host
        sums, totals = values[: len(keys)], values[len(keys) :]
        # After the read: the device work is done. Checkpoints and evaluations do not count.
        seconds = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        means = {k: s / n for k, s, n in zip(keys, sums, totals, strict=True)}
        means |= {
            "images_per_s": self.images * world_size / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "data_wait_share": self.data_wait_s / seconds,
            "steps_in_mean": self.steps,
        }
        self.reset()
        return means

"""Exponential moving average of G's weights, in fp32 (used for samples and evaluation).

Which ranks run it: every rank keeps its own copy; the updates are identical on all ranks
because the weights are (data parallel), so no communication is needed.

Warm-up: the decay used at update n is min(decay, (1 + n) / (warmup + n)) (TensorFlow's
ExponentialMovingAverage with num_updates uses warmup 10). Without it, a 0.999 average still
weighs the random initial weights by 0.999**n: about half after 700 steps, which greys out
early samples. With it, the average spans about the last n / (warmup - 1) updates, so with
warmup 10 a decay above 0.999 only takes effect after 9000 updates.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().float(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)  # BatchNorm running stats and counters: the latest, not averaged
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])

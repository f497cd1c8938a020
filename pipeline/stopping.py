"""Whether to stop between steps: a preemption signal to any rank, or losses that stay non-finite.

Neither can wait for a logging step, and neither may make a step wait for the device. So a
signal only sets a flag, the non-finite streak is counted on the device, and `StopCheck.agree`
settles both every `train.sync_every` steps with one tiny all-reduce (max), at the same steps
on every rank.

Which ranks: every rank holds a StopCheck; `agree` is a collective all ranks call together.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from pipeline.errors import PREEMPTION_SIGNALS, NonFiniteLoss


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop acts on it between steps on all ranks.

    A signal to any one rank reaches all of them through StopCheck.agree, within
    train.sync_every steps (docs/checkpoints.md, "Preemption"); a second signal during the
    save only sets the flag again."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Kept until the CLI's teardown, which then ignores these signals: a signal that
        lands while a preempted rank shuts down (the deepspeed launcher SIGTERMs the
        survivors) must not kill it mid-exit."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self)
        return self


class Divergence:
    """Counts consecutive steps with a non-finite loss, on the device (no wait per step)."""

    def __init__(self, device: torch.device, streak: int = 0):
        self.streak = torch.tensor(streak, device=device)
        self.longest = self.streak.clone()  # the longest streak since the last agreement

    def add(self, *losses: torch.Tensor) -> None:
        finite = torch.stack([torch.isfinite(loss.detach()).all() for loss in losses]).all()
        self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        self.longest = torch.maximum(self.longest, self.streak)


class StopCheck:
    """The preemption flag and the divergence count of this rank, and their agreement."""

    def __init__(self, device: torch.device, max_nonfinite_steps: int, streak: int = 0):
        self.preemption = PreemptionFlag()
        self.divergence = Divergence(device, streak)
        self.max_nonfinite_steps = max_nonfinite_steps

    def add(self, *losses: torch.Tensor) -> None:
        self.divergence.add(*losses)

    def agree(self, step: int) -> bool:
        """Collective: whether any rank got a preemption signal. Raises NonFiniteLoss when any
        rank's losses stayed non-finite for max_nonfinite_steps steps."""
        divergence = self.divergence
        device = divergence.streak.device
        signalled = torch.tensor(float(self.preemption.signum is not None), dtype=torch.float64, device=device)
        packed = torch.stack([signalled, divergence.longest.double()])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        signal_seen, longest = packed.tolist()  # the one copy to the host
        divergence.longest = divergence.streak.clone()
        if longest >= self.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"losses non-finite for {int(longest)} consecutive steps (found at step {step}, "
                f"limit train.max_nonfinite_steps={self.max_nonfinite_steps}); training diverged. "
                "Lower the learning rates, use fp32/bf16, or enable gradient clipping."
            )
        return signal_seen > 0

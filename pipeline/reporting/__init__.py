"""What a training run reports, in components the training loop calls between steps.

The Trainer trains: after each step, and after each checkpoint, it calls its reporters in
turn; none of them changes training state. Only `pipeline/run.py`, which builds a training run,
chooses the reporters; a Trainer built without them writes nothing but the checkpoints it is
asked for.

- run_records.py: the run folder's records (rank 0): progress line, metrics.jsonl, sample
  grids, set-up files, the final generator; and what the tracker gets of them.
- fid_scores.py: FID during training (all ranks evaluate, rank 0 records): fid.jsonl, the
  best FID and its checkpoint, the model logged after a new best.
- model_log.py: the generator handed to the tracker as a model, by either of the above.
"""

from __future__ import annotations

from pathlib import Path


def due(step: int, every: int, last_step: int) -> bool:
    """Whether an every-N-steps action falls on `step`: its multiples, and the run's last step."""
    return step % every == 0 or step == last_step


class Reporter:
    """A component the Trainer calls between steps; every method does nothing unless overridden.
    None may change training state. Which ranks: the builder gives each rank the reporters it
    runs (rank 0 the records; every rank the FID evaluation, a collective)."""

    def wants_checkpoint(self, step: int) -> bool:
        """Whether this step needs a checkpoint (an FID evaluation may mark it as the best)."""
        return False

    def on_resume(self, step: int) -> None:
        """The run continues from the checkpoint of `step`: records written after it belong to a
        future that did not happen."""

    def on_train_start(self, trainer) -> None: ...

    def after_step(self, trainer, metrics: dict | None) -> None:
        """After each step; metrics: the window's means on logging steps (Trainer.read_metrics)."""

    def after_checkpoint(self, trainer, path: Path, seconds: float, stopping: bool) -> None:
        """After a checkpoint of this step was saved on every rank; stopping: a preemption's."""

    def on_train_end(self, trainer) -> None:
        """After the last step (not on a preemption or a failure)."""

    def close(self) -> None:
        """On every exit from the loop."""

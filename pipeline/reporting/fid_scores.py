"""FID during training: every eval.fid_every steps and at the end, on the checkpoint of that step.

Which ranks: every rank generates and extracts its share (a collective); rank 0 records the
result in RUN/fid.jsonl and the tracker, and when it is the lowest so far marks the step's
checkpoint as best (kept from pruning) and logs the generator as a model. The checkpoint is
saved before the (long) evaluation, so a kill during it loses nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.files import keep_records_through
from pipeline.metric_names import fid_metrics
from pipeline.reporting import Reporter, due

log = logging.getLogger("pipeline.train")
FID_LOG = "fid.jsonl"


class FidScores(Reporter):
    def __init__(self, evaluator, config, run_dir: Path, is_main: bool, tracker=None, model_log=None):
        """evaluator: an evaluation.fid.FidEvaluator; tracker and model_log: rank 0's."""
        self.evaluator, self.config, self.run_dir, self.is_main = evaluator, config, Path(run_dir), is_main
        self.tracker, self.model_log = tracker, model_log
        self.best: tuple[float, int] | None = None  # (fid, step), rank 0
        self.last: dict | None = None  # the newest evaluation's result and its step, for the end-of-run verdict

    def setup(self) -> dict:
        """The FID set-up the run records at its start (tracking/describe.py)."""
        return {"reference": self.evaluator.reference.describe, "protocol": self.evaluator.extractor.protocol}

    def on_resume(self, step: int) -> None:
        """Rank 0: the evaluations after the resumed checkpoint are dropped; the best is read back."""
        if self.is_main:
            scored = [(r["fid"], r["step"]) for r in keep_records_through(self.run_dir / FID_LOG, step)]
            self.best = min(scored) if scored else None

    def wants_checkpoint(self, step: int) -> bool:
        return due(step, self.config.eval.fid_every, self.config.train.steps)

    def after_checkpoint(self, trainer, path: Path, seconds: float, stopping: bool) -> None:
        if stopping or not self.wants_checkpoint(trainer.global_step):
            return
        step = trainer.global_step
        result = self.evaluator(trainer.sampling_generator())
        self.last = result | {"step": step}
        if not self.is_main:
            return
        with open(self.run_dir / FID_LOG, "a") as f:
            f.write(json.dumps({"step": step, "checkpoint": path.name, **result}) + "\n")
        self.tracker.log_metrics(fid_metrics(result), step)
        self.model_log.scored(self.last)
        if self.best is None or result["fid"] < self.best[0]:
            self.best = (result["fid"], step)
            trainer.checkpointer.mark_best(path)
            self.model_log.log(trainer, result)
            self.tracker.set_tags(
                {"best_fid": f"{result['fid']:.4f}", "best_fid_step": step, "checkpoint.best": str(path.resolve())}
            )
            self.tracker.log_metrics({"best_fid": result["fid"]}, step)  # sortable in the runs table
            self.tracker.update_parent()
        log.info(
            "step %d FID %.3f%s%s (n_generated=%d, n_reference=%d, %.0f s); best %.3f at step %d",
            step,
            result["fid"],
            f" KID {result['kid']:.5f}" if "kid" in result else "",
            f" precision {result['precision']:.3f} recall {result['recall']:.3f}" if "precision" in result else "",
            result["n_generated"],
            result["n_reference"],
            result["seconds"],
            *self.best,
        )

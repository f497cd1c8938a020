"""Offline sync: what a run folder recorded and its MLflow run lacks, delivered once.

Which ranks run it: rank 0 (the tracker's thread, on a resume: what an earlier job could
not deliver), and `pipeline sync-tracking RUN_DIR` after a run that tracked nowhere.
"""

from __future__ import annotations

import collections
import math
import re
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import read_json_lines
from pipeline.metric_names import FID_FIELDS, RECORD_ONLY, SECTIONED

BATCH_LIMIT = 1000  # MLflow's log_batch limit on metrics per call
SAMPLE_ARTIFACT = re.compile(r"samples\+step\+(\d+)\+")  # how MLflow's log_image names a grid's file


def recorded_metrics(run_dir: Path, up_to_step: int | None) -> dict[str, dict[int, float]]:
    """{sectioned name: {step: value}} of metrics.jsonl and fid.jsonl, of steps up to `up_to_step`."""
    wanted: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for name, rename in (("metrics.jsonl", None), ("fid.jsonl", FID_FIELDS)):
        path = Path(run_dir) / name
        for record in read_json_lines(path) if path.exists() else []:
            step = int(record["step"])
            if up_to_step is not None and step > up_to_step:
                continue
            for key, value in record.items():
                key = rename.get(key) if rename is not None else key
                key = SECTIONED.get(key, key)  # a run folder from before the sections
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key and key not in ("step", *RECORD_ONLY) and number and not math.isnan(float(value)):
                    wanted[key][step] = float(value)
    return wanted


def sync_records(client, run_id: str, run_dir: Path, up_to_step: int | None = None) -> dict:
    """Deliver what the run folder recorded and its MLflow run lacks, each once: the metric values
    of metrics.jsonl and fid.jsonl (by key and step) and the sample grids (samples/step_N.png),
    of steps up to `up_to_step` (all by default). What the run has is read back first, so running
    it again delivers nothing new."""
    from mlflow.entities import Metric
    from PIL import Image

    now = int(time.time() * 1000)
    missing = []
    for key, values in recorded_metrics(run_dir, up_to_step).items():
        present = {m.step for m in client.get_metric_history(run_id, key)}
        missing += [Metric(key, value, now, step) for step, value in sorted(values.items()) if step not in present]
    for start in range(0, len(missing), BATCH_LIMIT):
        client.log_batch(run_id, metrics=missing[start : start + BATCH_LIMIT], synchronous=True)
    logged = {int(m.group(1)) for a in client.list_artifacts(run_id, "images") if (m := SAMPLE_ARTIFACT.search(a.path))}
    grids = 0
    for grid in sorted((Path(run_dir) / "samples").glob("step_*.png")):
        step = int(grid.stem.removeprefix("step_"))
        if step not in logged and (up_to_step is None or step <= up_to_step):
            with Image.open(grid) as image:
                client.log_image(run_id, image.copy(), key="samples", step=step, synchronous=True)
            grids += 1
    return {"metric_values": len(missing), "sample_grids": grids}


def find_run(client, experiment_id: str, run_dir: Path):
    """The MLflow run of a run folder (every run is tagged with its folder's absolute path)."""
    found = client.search_runs([experiment_id], f"tags.run_dir = '{Path(run_dir).resolve()}'", max_results=2)
    if not found:
        raise UserError(
            f"no MLflow run of {run_dir} in this store (looked for tag run_dir = {Path(run_dir).resolve()})"
        )
    return found[0]

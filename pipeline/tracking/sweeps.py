"""Sweeps: child runs nested under one parent run, which carries the best child's FID.

Which ranks run it: rank 0 of each child (from its tracker), and `pipeline runs` on the
command line. A child names its parent with tracking.parent_run; slurm/sweep.sbatch sets it
for every task of a job array.
"""

from __future__ import annotations

import time

from pipeline.errors import UserError
from pipeline.metric_names import BEST_FID, run_metric
from pipeline.tracking.store import Store, file_lock

SWEEP_TAG, ROLE_TAG = "sweep", "sweep_role"  # parent: (NAME, parent); each child: (NAME, child)


def sweep_runs(client, experiment_id: str, name: str, role: str) -> list:
    """The parent (role "parent") or the children ("child") of sweep NAME, oldest first."""
    query = f"tags.{SWEEP_TAG} = '{name}' and tags.{ROLE_TAG} = '{role}'"
    return client.search_runs([experiment_id], query, max_results=10_000, order_by=["attributes.start_time ASC"])


def child_tags(parent_run_id: str, name: str) -> dict:
    """A child's tags. mlflow.parentRunId is MLflow's own nesting: the UI shows the children under the parent."""
    return {"mlflow.parentRunId": parent_run_id, SWEEP_TAG: name, ROLE_TAG: "child"}


def find_or_create_parent(store: Store, lock_folder, name: str) -> str:
    """The id of the parent run NAME in this experiment, made by the first child to get here.
    The children of a job array start together, on several nodes: a lock file in the shared
    run_root makes the look-up-or-create one step."""
    with file_lock(lock_folder / f"{name}.parent-lock", f"parent run {name}"):
        found = sweep_runs(store.client, store.experiment_id, name, "parent")
        if found:
            return found[0].info.run_id
        tags = {SWEEP_TAG: name, ROLE_TAG: "parent"}
        return store.client.create_run(store.experiment_id, run_name=name, tags=tags).info.run_id


def summarize_into_parent(client, experiment_id: str, parent_run_id: str, name: str) -> None:
    """Recompute the parent's summary from all its children, so the last child to write leaves it
    right whatever the order: best_fid (the lowest of the children's best_fid) with the child's
    run id, name and overrides as tags; RUNNING while a child runs, else FINISHED."""
    from mlflow.entities import Metric, RunTag

    children = sweep_runs(client, experiment_id, name, "child")
    scored = [
        (fid, c.info.start_time, c) for c in children if (fid := run_metric(c.data.metrics, "best_fid")) is not None
    ]
    if scored:
        fid, _, best = min(scored, key=lambda item: item[:2])
        tags = {
            "best_child_run_id": best.info.run_id,
            "best_child": best.info.run_name,
            "best_child_overrides": best.data.tags.get("overrides", ""),
        }
        metric = Metric(BEST_FID, fid, int(time.time() * 1000), 0)
        client.log_batch(parent_run_id, metrics=[metric], tags=[RunTag(k, v) for k, v in tags.items()])
    running = any(c.info.status in ("RUNNING", "SCHEDULED") for c in children)
    status = client.get_run(parent_run_id).info.status
    if running and status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")
    elif not running and status == "RUNNING":
        client.set_terminated(parent_run_id, status="FINISHED")


def compare_sweep(client, experiment_id: str, name: str) -> dict:
    """The children of parent run NAME, lowest best_fid first (unscored last): run name, status,
    step, best_fid, latest fid, and the config params whose values differ between them."""
    parents = sweep_runs(client, experiment_id, name, "parent")
    if not parents:
        raise UserError(f"no parent run named {name!r} in this experiment (tracking.parent_run; slurm/sweep.sbatch)")
    children = sweep_runs(client, experiment_id, name, "child")
    same_for_all = ("config.train.run_name", "config.tracking.run_name", "config.tracking.parent_run")
    keys = sorted({k for c in children for k in c.data.params if k.startswith("config.") and k not in same_for_all})
    differing = [k for k in keys if len({c.data.params.get(k) for c in children}) > 1]
    rows = [
        {
            "run": c.info.run_name,
            "run_id": c.info.run_id,
            "status": c.info.status,
            "step": int(c.data.tags["checkpoint.step"]) if "checkpoint.step" in c.data.tags else None,
            "best_fid": run_metric(c.data.metrics, "best_fid"),
            "fid": run_metric(c.data.metrics, "fid"),
            "overrides": c.data.tags.get("overrides", ""),
            **{k.removeprefix("config."): c.data.params.get(k) for k in differing},
        }
        for c in children
    ]
    rows.sort(key=lambda r: (r["best_fid"] is None, r["best_fid"] or 0.0))
    return {
        "parent": name,
        "parent_run_id": parents[0].info.run_id,
        "differing_params": [k.removeprefix("config.") for k in differing],
        "children": rows,
    }

"""MLflow's system metrics (CPU, memory, GPU, network), sampled per node.

Which ranks run it: rank 0 samples its node from its tracker; on a multi-node job with an
http(s) store, local rank 0 of each other node samples its own (`start_node_sampler`). On a
one-node job the names are MLflow's own (system/cpu_utilization_percentage...), which fill
the run page's System metrics section; on a multi-node job they carry the node
(system/NODE/...), one section per node, as every node samples into one run.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger("pipeline.tracking")


def system_metrics_on(tracking, device: torch.device) -> bool:
    """tracking.system_metrics: auto is on for GPU runs."""
    return device.type == "cuda" if tracking.system_metrics == "auto" else bool(tracking.system_metrics)


def node_name() -> str:
    """This node as Slurm names it, else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def sampler_node(tracking, info) -> str | None:
    """Rank 0's label for its node's system metrics: None when they are off, "" on a one-node
    job (MLflow's own names), the node's name on a multi-node job."""
    if not system_metrics_on(tracking, info.device):
        return None
    return node_name() if info.nodes > 1 else ""


def start_system_metrics(tracking, run_id: str, uri: str, node: str):
    """MLflow's system-metrics sampler of this node, started: a daemon thread that logs on its own
    into run_id (a failure stops it, never the training). node: "" for MLflow's own names."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    sampler = SystemMetricsMonitor(
        run_id,
        sampling_interval=tracking.system_metrics_every_s,
        node_id=node or None,
        tracking_uri=uri,
        resume_logging=True,  # after a resume, on from the run's last system step (0 for a new run)
    )
    sampler.start()
    return sampler


def start_node_sampler(tracking, info, tracker):
    """Every rank. On a multi-node job with system metrics on (the config, device and node count
    are every rank's alike, so all ranks skip together otherwise), rank 0 tells the others its run
    and store (a collective). Local rank 0 of each node but rank 0's starts the sampler for its
    node into that run, and returns it (None elsewhere). Only with an http(s) store: an sqlite
    file is no place for writers on several nodes, so then rank 0's node alone is sampled."""
    if not (system_metrics_on(tracking, info.device) and info.nodes > 1):
        return None  # no start-up collective for the common case
    shared = [tracker.run_id, tracker.uri]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared
    if not run_id:  # tracking off on rank 0
        return None
    remote = uri.split(":", 1)[0] in ("http", "https")
    if info.is_main and not remote:
        log.warning("system metrics: only node 0 is sampled; the other nodes need an http store (mlflow server)")
    if not remote or info.is_main or info.local_rank != 0:
        return None
    return start_system_metrics(tracking, run_id, uri, node_name())

"""pipeline.dist.detect: which rank, node and device this process is, from each launcher's variables."""

import os

import pytest
import torch

from pipeline import dist
from pipeline.errors import UserError
from tests.conftest import RENDEZVOUS_VARS as RENDEZVOUS


@pytest.mark.parametrize(
    "environment, visible, device",
    [
        # srun --gpus-per-task=1 (or --gpu-bind=single:1): local rank 3 sees its one GPU as device 0
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
        # srun --gpus-per-node=4: every rank sees the node's four GPUs
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4, 3),
        # the deepspeed launcher / torchrun with one CUDA_VISIBLE_DEVICES per rank
        (
            {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "2"},
            1,
            0,
        ),
    ],
    ids=["gpus-per-task", "gpus-per-node", "one-visible-device-per-rank"],
)
def test_each_rank_finds_its_gpu_whether_it_sees_one_or_all(monkeypatch, environment, visible, device):
    """dist.detect on a 4-GPU node. No GPU here: torch.cuda's answers (is_available, device_count,
    set_device) are the one fake, as a node with `visible` GPUs per rank would give them."""
    slurm = {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1"}
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS, "MASTER_PORT")}
    env |= (slurm if "SLURM_PROCID" in environment else {"MASTER_ADDR": "127.0.0.1"}) | environment
    env.setdefault("MASTER_PORT", "29999")
    chosen = []
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    info = dist.detect("auto")
    assert info.device == torch.device("cuda", device) and chosen == [device]
    assert (
        info.local_rank == int(environment.get("SLURM_LOCALID", environment.get("LOCAL_RANK")))
        and info.backend == "nccl"
    )


def test_ranks_seeing_some_but_not_all_gpus_are_refused_naming_the_fix():
    from pipeline.dist import cuda_device_index

    assert cuda_device_index(3, 4, 8) == 3 and cuda_device_index(3, 4, 1) == 0
    with pytest.raises(
        UserError, match="4 ranks per node but 2 CUDA device.s. visible to local rank 3.*--gpus-per-task=1"
    ):
        cuda_device_index(3, 4, 2)

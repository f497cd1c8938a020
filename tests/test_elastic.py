"""Resuming on another world size: real torchrun processes on CPU (gloo), real DeepSpeed engines
and checkpoints. One run goes 2 ranks -> 1 rank -> 3 ranks inside one epoch, keeping its
global batch of 24 (12 x 1 per rank, then 12 x accumulation 2, then 8 x 1)."""

import json
import sys

import pytest

from pipeline.config import load_config
from pipeline.dist import free_port
from pipeline.errors import UserError
from pipeline.resize import Split, plan_resize
from tests.conftest import REPO, run, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow

EPOCH = 512  # the mnist_shards fixture
GLOBAL_BATCH = 24


def segment(shards, tmp_path, world: int, steps: int, *extra) -> dict:
    """Run the run `e` on `world` ranks up to `steps` global steps; the job's record."""
    out = tmp_path / f"segment_{world}_{steps}.json"
    overrides = train_overrides(
        shards,
        tmp_path,
        f"train.steps={steps}",
        "train.run_name=e",
        f"data.batch_per_rank={GLOBAL_BATCH // 2}",
        "train.g_optim.lr=0.001",
        "train.d_optim.lr=0.001",
        "tracking.enabled=false",
        *extra,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master_port", free_port()]
    command = [*torchrun, "--nproc_per_node", world, REPO / "tests/dist_elastic_job.py", out, *overrides]
    fp16 = "deepspeed.precision=fp16" in extra
    done = run(command, timeout=240, env={"PYTHONPATH": str(REPO), "PIPELINE_TEST_CPU_FP16": "1" if fp16 else "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "precision",
    [
        ("deepspeed.precision=fp32", "deepspeed.zero_stage=0"),
        # class-conditional too: its embeddings go through ZeRO-1's universal checkpoint like any weight
        ("deepspeed.precision=bf16", "deepspeed.zero_stage=1", "model.conditional=true"),
        # fp16 on this CPU (see conftest.cpu_fp16); 2**20: the first steps overflow, so the
        # scale and the skip counters have moved before each save.
        pytest.param(
            ("deepspeed.precision=fp16", "deepspeed.zero_stage=1", "deepspeed.fp16_initial_scale_power=20"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["zero0-fp32", "zero1-bf16-conditional", "zero1-fp16"],
)
def test_a_run_moves_between_world_sizes_inside_an_epoch(mnist_shards, tmp_path, precision):
    first = segment(mnist_shards, tmp_path, 2, 5, *precision)
    if "deepspeed.zero_stage=1" in precision:  # a half-made universal copy (a copy cut short) is rebuilt, not trusted
        half = tmp_path / "runs" / "e" / "checkpoints" / "step_0000005" / "g" / "universal" / "engine"
        half.mkdir(parents=True)
        (half / "mp_rank_00_model_states.pt").write_bytes(b"")
    second = segment(mnist_shards, tmp_path, 1, 10, *precision)
    # 512 - 240 consumed = 272 left; 3 ranks x 8 take 11 batches each to the epoch's end.
    third = segment(mnist_shards, tmp_path, 3, 21, *precision)

    assert [(s["world_size"], s["batch_per_rank"], s["accumulation"]) for s in (first, second, third)] == [
        (2, 12, 1),
        (1, 12, 2),
        (3, 8, 1),
    ]
    for earlier, later in ((first, second), (second, third)):  # what was saved is what was loaded
        saved = earlier["adam_steps_at_end"]
        scaler = earlier["scaler_at_end"]  # the loss scaler too (DeepSpeed's universal load skips it)
        assert later["loaded"] == {"adam_steps": saved, "g": True, "d": True, "ema": True, "scaler": scaler}
        skipped = later["scaler_at_end"]["g"][1] - scaler["g"][1]  # fp16 updates skipped after an overflow
        assert later["adam_steps_at_end"]["g"] - saved["g"] == len(later["losses"]) - skipped  # one update a step
    if "deepspeed.precision=fp16" in precision:
        assert first["scaler_at_end"]["g"][1] > 0 and first["scaler_at_end"]["g"][0] < 2**20
    delivered = [key for s in (first, second, third) for rank in s["keys"] for batch in rank for key in batch]
    assert len(delivered) == len(set(delivered)), "a sample was seen twice in one epoch"
    assert len(delivered) == 120 + 120 + 264 and EPOCH - len(delivered) == 272 % GLOBAL_BATCH
    assert len({len(rank) for rank in third["keys"]}) == 1  # every rank took as many batches
    assert third["loader"] == {
        "epoch": 1,
        "batches_consumed": 0,
        "world_size": 3,
        "batch_per_rank": 8,
        "history": [],
        "corrupt_samples": 0,
    }
    # The losses go on from where they were, not from an untrained pair's (D's starts at 2 ln 2).
    # Not with fp16: its first segment skips most updates, so its losses barely move (the
    # loaded weights are compared with the checkpoint's above either way).
    start, end = first["losses"][0][0], first["losses"][-1][0]
    for later in (second, third) if "deepspeed.precision=fp16" not in precision else ():
        assert abs(later["losses"][0][0] - end) < abs(start - end) / 2, (first["losses"], later["losses"])


def test_the_global_batch_is_split_anew_or_refused_with_its_numbers(mnist_shards, tmp_path):
    config = load_config(None, train_overrides(mnist_shards, tmp_path, "data.batch_per_rank=128"))
    meta = {"world_size": 4, "config": config.model_dump(mode="json")}
    assert plan_resize(meta, config, 4) is None
    assert plan_resize(meta, config, 2).new == Split(2, 128, 2)
    assert plan_resize(meta, config, 8).new == Split(8, 64, 1)
    assert plan_resize(meta, config, 1).describe(300) == (
        "resumed from step 300: world size 4 -> 1, global batch kept at 512 (batch 128 x accumulation 4)"
    )
    with pytest.raises(UserError, match=r"512 / 3 is not whole.*train.elastic_batch=per_rank .* 384"):
        plan_resize(meta, config, 3)
    per_rank = config.model_copy(update={"train": config.train.model_copy(update={"elastic_batch": "per_rank"})})
    assert plan_resize(meta, per_rank, 3).describe(7) == (
        "resumed from step 7: world size 4 -> 3, global batch 512 -> 384 (batch 128 x accumulation 1) "
        "(train.elastic_batch: per_rank)"
    )

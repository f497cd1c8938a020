"""Nothing in a training step makes the host wait for the device (pipeline/device_waits.py).

On a GPU each read-back (`.item()`, `bool(t)`, `.tolist()`) or synchronize() drains the
queue of work the host has sent ahead; the steps must send and not wait. The counter sees
those calls on this CPU where a GPU run would make them. Goals, per non-logging step:
- fp32 and bf16 at ZeRO 0-2 (bf16 at stage 0 is refused in config validation): none;
- fp16: only DeepSpeed's own overflow decision, which it must read to choose between
  applying and skipping an update: per engine, the overflow flag
  (deepspeed/runtime/zero/stage_1_and_2.py has_overflow, `overflow_gpu[0].item()`) and the
  finiteness of the gradient norm (deepspeed/runtime/utils.py is_invalid_grad_norm,
  `bool(...)`): at most 4 a step for the two engines.
A logging step reads the window once; a `should_stop` step once.
"""

from pathlib import Path

import pytest

from pipeline import engines
from pipeline.config import load_config
from pipeline.device_waits import count_device_waits
from pipeline.train import Trainer
from tests.conftest import REPO

CONFIGS = sorted(str(path.relative_to(REPO)) for path in (REPO / "configs").glob("*.yaml"))
# DeepSpeed's fp16 overflow decision, the only waits an fp16 step may make: (file, function).
FP16_OVERFLOW_SITES = (("stage_1_and_2.py", "(has_overflow)"), ("runtime/utils.py", "(is_invalid_grad_norm)"))
COUNTED_STEPS = 4
# What each case adds to a config: every precision x ZeRO stage that trains, and the paths a
# shipped config does not take (WGAN-GP, n_critic, gradient accumulation, a linear lr decay).
MATRIX = {
    "fp32-zero0": ["deepspeed.precision=fp32", "deepspeed.zero_stage=0"],
    "fp32-zero1": ["deepspeed.precision=fp32", "deepspeed.zero_stage=1"],
    "fp32-zero2": ["deepspeed.precision=fp32", "deepspeed.zero_stage=2"],
    "bf16-zero1": ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"],
    "bf16-zero2": ["deepspeed.precision=bf16", "deepspeed.zero_stage=2"],
    # fp16 with a penalty needs D without BatchNorm (pipeline/config.py): R1 on spectral norm, and BatchNorm without R1
    "fp16-zero1-r1-spectral": ["deepspeed.precision=fp16", "deepspeed.zero_stage=1", "model.d_norm=spectral"],
    "fp16-zero2-batchnorm": ["deepspeed.precision=fp16", "deepspeed.zero_stage=2", "loss.r1_gamma=0"],
    "bf16-zero1-wgan-gp-accumulation": [
        "deepspeed.precision=bf16",
        "deepspeed.zero_stage=1",
        "loss.kind=wgan-gp",
        "loss.n_critic=2",
        "deepspeed.gradient_accumulation=2",
        "train.lr_decay=linear",
    ],
    "fp32-zero0-channels-last-r1-every-step": ["model.channels_last=true", "loss.r1_gamma=1", "loss.r1_every=1"],
}


@pytest.fixture(scope="module")
def shards_by_shape(tmp_path_factory):
    """Raw shards of 32 real MNIST digits for each (resolution, channels) a config asks for."""
    from pipeline.data.prepare import Transform, prepare

    made = {}

    def shards(resolution: int, channels: int) -> Path:
        if (resolution, channels) not in made:
            out = tmp_path_factory.mktemp(f"mnist{resolution}x{channels}")
            prepare("mnist", out, Transform(resolution, channels, image_format="raw"), limit=32, progress=False)
            made[resolution, channels] = out
        return made[resolution, channels]

    return shards


def small_trainer(info, shards_by_shape, tmp_path, config_path: str | None, *extra) -> Trainer:
    """The config as shipped, on tiny widths and batches (what is counted does not depend on
    them), with FID, tracking and every interval's work out of the counted steps."""
    base = load_config(REPO / config_path if config_path else None, list(extra))
    overrides = [
        f"data.shards={shards_by_shape(base.model.resolution, base.model.channels)}",
        "data.batch_per_rank=8",
        "data.workers=0",
        "model.g_width=8",
        "model.d_width=8",
        "train.device=cpu",
        "train.progress=false",
        f"train.run_root={tmp_path}/runs",
        "eval.fid_every=0",
        "tracking.enabled=false",
        *extra,
    ]
    return Trainer(load_config(REPO / config_path if config_path else None, overrides), info, tmp_path / "run")


def counted_steps(trainer: Trainer):
    """The waits of COUNTED_STEPS steps after two warm-up steps (the first R1 and lr steps included)."""
    batches = trainer.loader.forever()
    for _ in range(2):
        trainer.train_step(batches)
    with count_device_waits(engines.accelerator()) as waits:
        for _ in range(COUNTED_STEPS):
            trainer.train_step(batches)
    batches.close()
    return waits


def assert_goal(waits, fp16: bool) -> None:
    report = f"device waits in {COUNTED_STEPS} steps, by call site:\n{waits.report()}"
    if not fp16:
        assert not waits.waits, report
        return
    others = [w for w in waits.waits if not any(f in w[1] and fn in w[1] for f, fn in FP16_OVERFLOW_SITES)]
    assert not others, report
    assert len(waits.waits) <= 4 * COUNTED_STEPS, report


@pytest.mark.parametrize("config_path", CONFIGS)
def test_shipped_configs_make_no_device_wait_per_step(dist_single, shards_by_shape, tmp_path, config_path, cpu_fp16):
    trainer = small_trainer(dist_single, shards_by_shape, tmp_path, config_path)
    assert_goal(counted_steps(trainer), trainer.config.deepspeed.precision == "fp16")


@pytest.mark.parametrize("case", MATRIX)
def test_precision_and_zero_matrix_makes_no_device_wait_per_step(
    dist_single, shards_by_shape, tmp_path, case, cpu_fp16
):
    trainer = small_trainer(dist_single, shards_by_shape, tmp_path, "configs/mnist32.yaml", *MATRIX[case])
    waits = counted_steps(trainer)
    assert_goal(waits, trainer.config.deepspeed.precision == "fp16")
    if trainer.config.deepspeed.precision == "fp16":
        assert waits.waits, "fp16 must decide on overflows: the counter saw none (is it counting?)"


def test_the_counter_sees_each_kind_of_wait(dist_single):
    """The counter itself: reads back through the dispatcher and through Python, and the
    accelerator's synchronize; reads in torch.optim are listed apart as host-resident."""
    import torch

    x = torch.ones(3)
    with count_device_waits(engines.accelerator()) as waits:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x.nonzero()
        engines.accelerator().synchronize()
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
        optimizer.zero_grad()
        optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
        optimizer.step()
    kinds = [kind for kind, _ in waits.waits]
    assert kinds == ["_local_scalar_dense", "_local_scalar_dense", "tolist", "nonzero", "synchronize"], waits.report()
    assert all("test_device_waits.py" in site for _, site in waits.waits)
    assert waits.host_resident and all("torch.optim" in why for _, _, why in waits.host_resident)


def test_logging_and_should_stop_steps_read_back_once(dist_single, shards_by_shape, tmp_path):
    trainer = small_trainer(dist_single, shards_by_shape, tmp_path, "configs/mnist32.yaml")
    batches = trainer.loader.forever()
    trainer.train_step(batches)
    with count_device_waits(engines.accelerator()) as reading:
        trainer.read_metrics()
    with count_device_waits(engines.accelerator()) as settling:
        trainer.should_stop()
    batches.close()
    assert [kind for kind, _ in reading.waits] == ["tolist"], reading.report()
    assert [kind for kind, _ in settling.waits] == ["tolist"], settling.report()

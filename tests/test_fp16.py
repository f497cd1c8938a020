"""fp16 through DeepSpeed on this CPU (the cpu_fp16 fixture says why that is real fp16): the
loss scale's life, skipped updates, gradient penalties at the loss scale, and divergence at
the minimum scale."""

import copy
import json
import sys

import pytest
import torch

from pipeline import losses
from pipeline.config import load_config
from pipeline.errors import ConfigError, NonFiniteLoss, UserError
from pipeline.images import from_uint8
from pipeline.models import build_pair
from pipeline.train import Trainer
from tests.conftest import REPO, run, step_losses, train_overrides

FP16 = ("deepspeed.precision=fp16", "deepspeed.zero_stage=1")


def make(dist_single, shards, tmp_path, *extra):
    return Trainer(load_config(None, train_overrides(shards, tmp_path, *FP16, *extra)), dist_single, tmp_path / "run")


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_exact_with_the_loss_scale_and_skip_counters(dist_single, mnist_shards, tmp_path, cpu_fp16, stage):
    """Same world size: the continuation is bit for bit the uninterrupted run's, the dynamic loss
    scale and the skipped-update counters included. A high first scale makes the first
    steps overflow, so there is something to restore."""
    extra = (f"deepspeed.zero_stage={stage}", "deepspeed.fp16_initial_scale_power=24", "data.workers=1")
    trainer = make(dist_single, mnist_shards, tmp_path, *extra)
    step_losses(trainer, trainer.loader.forever(), 4)
    path = trainer.save_checkpoint()
    engines = (trainer.d_engine, trainer.g_engine)
    saved = [(e.loss_scale, e.skipped_steps) for e in engines]
    expected = step_losses(trainer, trainer.loader.forever(), 3)
    assert all(skipped > 0 for _, skipped in saved) and all(scale < 2**24 for scale, _ in saved), saved

    fresh = make(dist_single, mnist_shards, tmp_path, *extra)
    fresh.resume(path)
    assert [(e.loss_scale, e.skipped_steps) for e in (fresh.d_engine, fresh.g_engine)] == saved
    assert step_losses(fresh, fresh.loader.forever(), 3) == expected
    assert [(e.loss_scale, e.skipped_steps) for e in (fresh.d_engine, fresh.g_engine)] == [
        (e.loss_scale, e.skipped_steps) for e in engines
    ]


def test_a_skipped_update_leaves_the_ema_and_the_logged_norms_alone(dist_single, mnist_shards, tmp_path, cpu_fp16):
    """The first step at scale 2**30 overflows in both networks: DeepSpeed skips both updates.
    The EMA must not average in G's unchanged weights as a step, and an overflowed step's
    gradient norm (inf) must not make the window's mean inf."""
    trainer = make(dist_single, mnist_shards, tmp_path, "deepspeed.fp16_initial_scale_power=30")
    ema_before = copy.deepcopy(trainer.ema.model.state_dict())
    batches = trainer.loader.forever()
    trainer.train_step(batches)
    assert not trainer.g_engine.step_applied and not trainer.d_engine.step_applied
    assert trainer.ema.updates == 0
    assert all(torch.equal(v, ema_before[k]) for k, v in trainer.ema.model.state_dict().items())
    metrics = trainer.read_metrics()
    assert "grad_norm_G" not in metrics and "grad_norm_D" not in metrics  # no applied update to measure
    assert metrics["skipped_steps_G"] == 1 and metrics["skipped_steps_D"] == 1

    # The scale halves per overflow (after the hysteresis of 2): within 30 steps updates apply.
    for _ in range(30):
        trainer.train_step(batches)
    metrics = trainer.read_metrics()
    applied = 31 - metrics["skipped_steps_G"]
    assert applied > 0 and trainer.ema.updates == applied
    assert torch.isfinite(torch.tensor([metrics["grad_norm_G"], metrics["grad_norm_D"]])).all(), metrics


@pytest.mark.slow
def test_overflow_at_the_minimum_loss_scale_is_divergence_exit_3(dist_single, mnist_shards, tmp_path, cpu_fp16):
    """DeepSpeed's loss scaler raises a bare Exception there (loss_scaler.py update_scale): it
    must reach the user as NonFiniteLoss (exit 3, one line), not as a traceback with exit 1."""
    pinned = (
        "deepspeed.fp16_initial_scale_power=30",
        f"deepspeed.fp16_min_loss_scale={2.0**30}",
        "deepspeed.fp16_hysteresis=1",
    )
    trainer = make(dist_single, mnist_shards, tmp_path, *pinned)
    with pytest.raises(NonFiniteLoss, match="overflowed at the minimum loss scale") as caught:
        trainer.train_step(trainer.loader.forever())
    assert caught.value.exit_code == 3

    overrides = train_overrides(
        mnist_shards, tmp_path / "cli", *FP16, *pinned, "train.steps=3", "tracking.enabled=false"
    )
    cli = "from tests.conftest import allow_cpu_fp16; allow_cpu_fp16(); from pipeline.cli import entry; entry()"
    done = run([sys.executable, "-c", cli, "train", *overrides], timeout=120, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "overflowed at the minimum loss scale" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("penalty", ["r1", "wgan-gp"])
def test_gradient_penalties_in_fp16_match_fp32_when_taken_at_the_loss_scale(penalty):
    """The penalty's input gradient taken in fp16 at the loss scale (torch's AMP recipe) matches
    fp32 to 1% on the same weights and batch; taken unscaled it underflows. D's last layer is
    scaled down 1000-fold: input gradients as small as R1 makes them later in training
    (at initialisation they are still large enough for fp16)."""
    config = load_config(None, ["model.d_width=16", "model.g_width=16"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, d32 = build_pair(config.model)
        last = [m for m in d32.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.mul_(1e-3)
        real32 = from_uint8(torch.randint(0, 256, (16, 32, 32, 1), dtype=torch.uint8), torch.float32)
        fake32 = torch.rand_like(real32) * 2 - 1
    d16, real16, fake16 = copy.deepcopy(d32).half(), real32.half(), fake32.half()

    def value(d, real, fake, scale):
        if penalty == "r1":
            return losses.r1_penalty(d, real, scale).item()
        return losses.gradient_penalty(d, real, fake, torch.Generator().manual_seed(1), scale).item()

    expected = value(d32, real32, fake32, 1.0)
    scaled = value(d16, real16, fake16, 2.0**12)
    unscaled = value(d16, real16, fake16, 1.0)
    assert scaled == pytest.approx(expected, rel=1e-2), (expected, scaled, unscaled)
    # The GP's value, (||g|| - 1)^2, is near 1 for any small g: its input gradients show the underflow.
    if penalty == "wgan-gp":
        x = (real32 + fake32) / 2
        expected, scaled, unscaled = (
            losses.input_gradient(d, x_.requires_grad_(True), scale).norm().item()
            for d, x_, scale in ((d32, x.clone(), 1.0), (d16, x.half(), 2.0**12), (d16, x.half(), 1.0))
        )
        assert scaled == pytest.approx(expected, rel=1e-2), (expected, scaled, unscaled)
    assert abs(unscaled - expected) > 3 * abs(scaled - expected), (expected, scaled, unscaled)


@pytest.mark.parametrize(
    "penalty",
    [("loss.r1_gamma=1", "loss.r1_every=1", "model.d_norm=spectral"), ("loss.kind=wgan-gp", "model.d_norm=none")],
)
def test_fp16_run_with_a_penalty_keeps_its_d_updates(dist_single, mnist_shards, tmp_path, cpu_fp16, penalty):
    """With a penalty on every step, D's updates are not skipped any more often than G's: the
    penalty's gradient, taken at the loss scale, overflows only when the D loss's own would."""
    trainer = make(dist_single, mnist_shards, tmp_path, *penalty)
    step_losses(trainer, trainer.loader.forever(), 20)
    assert trainer.d_engine.skipped_steps <= trainer.g_engine.skipped_steps + 2, (
        trainer.d_engine.skipped_steps,
        trainer.g_engine.skipped_steps,
    )
    assert json.dumps(trainer.read_metrics())  # every figure is a plain number


def test_fp16_penalty_through_batchnorm_is_refused(dist_single, mnist_shards, tmp_path, cpu_fp16):
    """Through D's BatchNorm, the penalty's double backward in fp16 gives non-finite gradients
    at every loss scale down to 1 (measured on this CPU): each penalty step would be skipped
    until the run died at the minimum scale. Refused up front, in the config and for a raw
    DeepSpeed JSON that turns fp16 on."""
    for penalty in ("loss.r1_gamma=0.1", "loss.kind=wgan-gp"):
        with pytest.raises(ConfigError, match="fp16 with a gradient penalty needs model.d_norm spectral or none"):
            load_config(None, [*FP16, penalty])
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="fp16 with a gradient penalty needs model.d_norm spectral or none"):
        Trainer(
            load_config(
                None, train_overrides(mnist_shards, tmp_path, "loss.r1_gamma=0.1", f"deepspeed.d_config_json={raw}")
            ),
            dist_single,
            tmp_path / "run",
        )

"""Checkpoints in-process (1 rank): contents, exact continuation, compatibility, retention, safety."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline import engines
from pipeline.checkpoint import latest_checkpoint
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.export import load_generator
from pipeline.reporting.run_records import RunRecords
from pipeline.run import build_trainer, resolve_run
from pipeline.train import Trainer
from tests.conftest import REPO, child_env, run_cli, step_losses, train_overrides


def make(dist_single, shards, tmp_path, *extra):
    config = load_config(None, train_overrides(shards, tmp_path, *extra))
    return Trainer(config, dist_single, tmp_path / "run")


def losses_of(trainer, steps):
    return step_losses(trainer, trainer.loader.forever(), steps)


# ZeRO-1 bf16 too: its optimizer files hold DeepSpeed's LossScaler, ZeroStageEnum and
# fragment_address objects, which a weights_only load refuses unless they are allowed. NHWC
# weights too: their loaded Adam state is NCHW, which must not change a single update.
@pytest.mark.parametrize(
    "precision",
    [
        (),
        ("deepspeed.precision=bf16", "deepspeed.zero_stage=1"),
        ("model.channels_last=true",),
        # DiffAugment and the fake images' classes draw from the step rng; R1 takes the real classes.
        ("train.augment=[translation,cutout,color]", "loss.r1_gamma=1", "model.conditional=true"),
    ],
    ids=["fp32", "bf16-zero1", "fp32-channels-last", "fp32-conditional-diffaugment-r1"],
)
def test_checkpoint_contents_and_exact_continuation(dist_single, mnist_shards, tmp_path, precision):
    trainer = make(dist_single, mnist_shards, tmp_path, "data.workers=1", *precision)
    losses_of(trainer, 2)
    path = trainer.save_checkpoint()
    expected = losses_of(trainer, 3)  # what an uninterrupted run does next

    assert (path.parent / "latest").read_text().strip() == "step_0000002"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["config"]["model"]["g_width"] == 16
    assert {"torch", "deepspeed", "pipeline"} <= set(meta["versions"])
    client = torch.load(path / "client" / "rank_00000.pt", weights_only=True)
    assert client["loader"]["batches_consumed"] == 2 and {"python", "numpy", "torch", "step_generator"} <= set(
        client["rng"]
    )
    assert (path / "g" / "engine").is_dir() and (path / "d" / "engine").is_dir() and (path / "ema.pt").is_file()

    fresh = make(dist_single, mnist_shards, tmp_path, "data.workers=1", *precision)
    fresh.resume(path)
    assert fresh.global_step == 2
    assert losses_of(fresh, 3) == expected
    for a, b in zip(fresh.ema.model.parameters(), trainer.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incompatible_checkpoint_is_refused_saying_what_differs(dist_single, mnist_shards, tmp_path):
    trainer = make(dist_single, mnist_shards, tmp_path)
    losses_of(trainer, 1)
    path = trainer.save_checkpoint()
    other = make(dist_single, mnist_shards, tmp_path, "model.g_width=8", "train.g_optim.lr=0.001")
    with pytest.raises(UserError, match="does not fit this job") as err:
        other.resume(path)
    assert "model: checkpoint" in str(err.value) and "train.g_optim" in str(err.value)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"world_size": 4}))
    with pytest.raises(UserError, match="saved on 4 ranks, this job has 1: build the trainer with build_trainer"):
        make(dist_single, mnist_shards, tmp_path).resume(path)
    # allowed to change: the step budget, intervals, run folder
    (path / "meta.json").write_text(json.dumps(meta))
    make(dist_single, mnist_shards, tmp_path, "train.steps=99", "train.log_every=7").resume(path)
    make(dist_single, mnist_shards, tmp_path, "model.channels_last=true").resume(path)  # a layout only
    # A checkpoint from before a setting existed ran with its default: it resumes under the
    # default and is refused under another value.
    del meta["config"]["train"]["ema_warmup"]
    del meta["config"]["model"]["conditional"], meta["config"]["model"]["num_classes"]
    (path / "meta.json").write_text(json.dumps(meta))
    make(dist_single, mnist_shards, tmp_path).resume(path)
    with pytest.raises(UserError, match="model: checkpoint"):
        make(dist_single, mnist_shards, tmp_path, "model.conditional=true").resume(path)
    with pytest.raises(UserError, match="train.ema_warmup: checkpoint 10.0, now 4.0"):
        make(dist_single, mnist_shards, tmp_path, "train.ema_warmup=4").resume(path)


def test_keeps_the_newest_k_plus_best(dist_single, mnist_shards, tmp_path):
    trainer = make(dist_single, mnist_shards, tmp_path, "train.keep_checkpoints=2")
    saved = []
    for _ in range(4):
        losses_of(trainer, 1)
        saved.append(trainer.save_checkpoint())
        if len(saved) == 1:
            trainer.checkpointer.mark_best(saved[0])
    names = sorted(p.name for p in saved[0].parent.iterdir() if p.is_dir())
    assert names == ["step_0000001", "step_0000003", "step_0000004"]
    assert trainer.checkpointer.latest() == saved[-1]


@pytest.mark.parametrize(
    "precision", [(), ("deepspeed.precision=bf16", "deepspeed.zero_stage=1")], ids=["fp32", "bf16-zero1"]
)
def test_crafted_engine_file_is_refused_before_deepspeed_unpickles_it(dist_single, mnist_shards, tmp_path, precision):
    trainer = make(dist_single, mnist_shards, tmp_path, *precision)
    path = trainer.save_checkpoint()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/PWNED",))

    targets = sorted((path / "d" / engines.ENGINE_TAG).glob("*.pt"))  # every file DeepSpeed would unpickle
    assert targets == engines.state_files(path / "d", rank=0) and len(targets) == (2 if precision else 1)
    for target in targets:
        with open(target, "wb") as f:
            pickle.dump({"module": Exploit()}, f)
    with pytest.raises(UserError, match="holds more than tensors; refused"):
        make(dist_single, mnist_shards, tmp_path, *precision).resume(path)
    assert not (tmp_path / "PWNED").exists()


def test_resume_modes(mnist_shards, tmp_path):
    config = load_config(None, train_overrides(mnist_shards, tmp_path, "train.run_name=r"))
    assert resolve_run(config, "x", "auto") == (tmp_path / "runs" / "r", None)  # nothing yet: fresh start
    with pytest.raises(UserError, match="--resume auto needs a stable run folder"):
        resolve_run(load_config(None, train_overrides(mnist_shards, tmp_path)), "x", "auto")
    step = tmp_path / "runs" / "r" / "checkpoints" / "step_0000003"
    step.mkdir(parents=True)
    meta = {"format": "gan-pipeline-checkpoint/1", "step": 3, "epoch": 0, "world_size": 1, "config": {}}
    (step / "meta.json").write_text(json.dumps(meta | {"config_hash": "h"}))
    (step.parent / "latest").write_text("step_0000003\n")
    with pytest.raises(UserError, match=r"already holds a run's work \(1 checkpoint folder\(s\)\).*--resume auto"):
        resolve_run(config, "x", "none")
    assert resolve_run(config, "x", "auto") == (tmp_path / "runs" / "r", step)
    assert resolve_run(config, "x", str(tmp_path / "runs" / "r")) == (tmp_path / "runs" / "r", step)
    latest_link = str(step.parent / "latest")  # was a NotADirectoryError traceback
    assert resolve_run(config, "x", latest_link) == (tmp_path / "runs" / "r", step)
    (step.parent / "step_0000004.tmp").mkdir()  # a half-written save is never picked
    assert resolve_run(config, "x", "auto")[1] == step
    (step.parent / "latest").unlink()  # a lost link: the work is still seen, and still resumed
    with pytest.raises(UserError, match="already holds a run's work"):
        resolve_run(config, "x", "none")
    assert resolve_run(config, "x", "auto")[1] == step


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint_and_resumes_exactly(mnist_shards, tmp_path):
    """SIGKILL the moment a save starts writing; `latest` still names a complete checkpoint,
    and the resumed run's losses equal an uninterrupted run's, step for step."""
    common = [
        "train",
        "--config",
        REPO / "configs/mnist32.yaml",
        *train_overrides(
            mnist_shards, tmp_path, "train.steps=6", "train.checkpoint_every=1", "model.g_width=64", "model.d_width=64"
        ),
    ]
    straight = run_cli(*common, "train.run_name=straight", timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, common), "train.run_name=killed"],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step_0000004.tmp/*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step_0000003"  # the save of step 4 never published

    resumed = run_cli(*common, "train.run_name=killed", "--resume", "auto", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()

    def per_step(name):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train/loss_D"], r["train/loss_G"]) for r in map(json.loads, lines)]

    assert per_step("killed") == per_step("straight")
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_export_and_sample_from_a_checkpoint_without_deepspeed(dist_single, mnist_shards, tmp_path):
    trainer = make(dist_single, mnist_shards, tmp_path)
    losses_of(trainer, 2)
    path = trainer.save_checkpoint()
    out = tmp_path / "G.pt"
    result = run_cli("export", "--checkpoint", tmp_path / "run", "--out", out)  # a run folder: its newest checkpoint
    assert result.returncode == 0, result.stderr
    payload = torch.load(out, weights_only=True)  # torch alone
    assert payload["step"] == 2 and payload["ema"] and payload["model"]["width"] == 16
    for key, value in trainer.ema.model.state_dict().items():
        assert torch.equal(payload["state_dict"][key], value.float())
    generator, _ = load_generator(path)
    assert generator(torch.randn(3, 100)).shape == (3, 1, 32, 32)
    sampled = run_cli("sample", "--checkpoint", path, "--n", 4, "--out", tmp_path / "g.png")
    assert sampled.returncode == 0 and "step 2 (EMA G)" in sampled.stdout
    assert (
        "deepspeed"
        not in subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, pipeline.export; pipeline.export.load_generator(sys.argv[1]); "
                "print(' '.join(m for m in sys.modules if m.startswith('deepspeed')))",
                str(path),
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=REPO,
            timeout=60,
        ).stdout
    )


def test_weight_files_let_export_read_a_run_without_ema(dist_single, mnist_shards, tmp_path):
    """Every checkpoint holds each network's weights as a plain fp32 state dict: `export` and
    `sample` read G's from there when the run kept no EMA, and never open DeepSpeed's files."""
    trainer = make(
        dist_single, mnist_shards, tmp_path, "train.ema=false", "deepspeed.precision=bf16", "deepspeed.zero_stage=1"
    )
    losses_of(trainer, 1)
    path = trainer.save_checkpoint()
    for network, engine in (("g", trainer.g_engine), ("d", trainer.d_engine)):
        weights = torch.load(path / f"{network}_weights.pt", weights_only=True)
        assert weights.keys() == engine.module.state_dict().keys()
        for key, value in engine.module.state_dict().items():
            expected = value.float() if value.is_floating_point() else value  # bf16 weights cast up
            assert weights[key].dtype == expected.dtype and torch.equal(weights[key], expected)
    out = tmp_path / "G.pt"
    result = run_cli("export", "--checkpoint", path, "--out", out)
    assert result.returncode == 0, result.stderr
    payload = torch.load(out, weights_only=True)
    assert payload["ema"] is False and payload["step"] == 1
    g_weights = torch.load(path / "g_weights.pt", weights_only=True)
    assert all(torch.equal(payload["state_dict"][k], v.float()) for k, v in g_weights.items())

    (path / "g_weights.pt").unlink()  # as in a checkpoint written before the weight files existed
    result = run_cli("sample", "--checkpoint", path, "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "has neither ema.pt nor g_weights.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_damaged_files_are_named_in_one_line(dist_single, mnist_shards, tmp_path):
    trainer = make(dist_single, mnist_shards, tmp_path)
    path = trainer.save_checkpoint()
    ema = path / "ema.pt"
    ema.write_bytes(ema.read_bytes()[:100])  # truncated
    result = run_cli("sample", "--checkpoint", path, "--out", tmp_path / "x.png")
    assert result.returncode == 2, result.stderr
    assert f"EMA file {ema} is damaged or not a torch file" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match=f"{ema} is damaged or not a torch file"):
        make(dist_single, mnist_shards, tmp_path).resume(path)

    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps({"not": "torch"}))
    result = run_cli("export", "--checkpoint", foreign, "--out", tmp_path / "y.pt")
    assert result.returncode == 2 and f"checkpoint {foreign} is damaged or holds more than tensors" in result.stderr
    assert "weights_only=False" not in result.stderr  # torch's unsafe advice is not repeated


@pytest.mark.parametrize("labelled", [True, False], ids=["device-recorded", "older-checkpoint"])
def test_a_gpu_checkpoint_resumes_on_cpu_with_streams_derived_anew(
    dist_single, mnist_shards, tmp_path, caplog, labelled
):
    """A CUDA generator's state (16 bytes: Philox seed and offset) does not fit a CPU generator
    (5056 bytes). The rank state says which device its step generator was on (checkpoints from
    before that are told by the state's size); on another device type this rank's streams are
    derived from (seed, step, rank), as after a resize, with a warning. No GPU here: the
    CUDA state is written into a CPU checkpoint's rank file, byte for byte as CUDA's would be."""
    trainer = make(dist_single, mnist_shards, tmp_path)
    losses_of(trainer, 1)
    path = trainer.save_checkpoint()
    rank_file = path / "client" / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=True)
    rng = state["rng"]
    rng["step_generator"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    rng["cuda"] = rng["step_generator"].clone()
    if labelled:
        rng["step_generator_device"] = "cuda"
    else:
        rng.pop("step_generator_device")
    torch.save(state, rank_file)

    fresh = make(dist_single, mnist_shards, tmp_path)
    with caplog.at_level("WARNING", logger="pipeline"):
        fresh.resume(path)
    assert "random streams are cuda's and this run is on cpu" in caplog.text
    assert all(map(torch.isfinite, torch.tensor(losses_of(fresh, 2)).flatten()))


def test_a_torn_last_log_line_is_dropped_on_resume_and_other_damage_named(dist_single, mnist_shards, tmp_path, caplog):
    """A kill -9 during a write leaves a torn last line in metrics.jsonl or fid.jsonl: resume
    drops it with a warning (and the records after the checkpoint), rewriting the file whole.
    A damaged line elsewhere is the user's to see: one message naming the file and line."""
    trainer = make(dist_single, mnist_shards, tmp_path)
    losses_of(trainer, 2)
    path = trainer.save_checkpoint()
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(
        '{"step": 1, "loss_D": 1.0}\n{"step": 2, "loss_D": 0.9}\n{"step": 3, "loss_D": 0.8}\n{"step": 4, "lo'
    )

    def resume():
        return build_trainer(trainer.config, dist_single, run_dir, path, [RunRecords(run_dir, trainer.config, None)])

    with caplog.at_level("WARNING", logger="pipeline"):
        resume()
    assert "dropped a torn last line" in caplog.text
    assert metrics.read_text() == '{"step": 1, "loss_D": 1.0}\n{"step": 2, "loss_D": 0.9}\n'
    metrics.write_text('{"step": 1, "loss_D": 1.0}\n{"step": 2, "lo\n{"step": 2, "loss_D": 0.9}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is damaged"):
        resume()

"""Class-conditional training (model.conditional): the networks, the labels from the shards,
class-balanced FID samples, grids with a row per class, `sample`/`export --class` and the
MLflow model that draws a chosen class. Exact resume and elastic resume of a conditional run
are parameters of tests/test_checkpoint.py and tests/test_elastic.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation.fid import _generated_batches
from pipeline.export import generate, load_generator
from pipeline.models import build_generator, build_pair
from pipeline.models.conditioning import class_labels, projection
from pipeline.train import Trainer
from tests.conftest import child_env, make_npz, run_cli, step_losses, train_overrides


def conditional_model(arch: str, classes: int = 10):
    config = load_config(None, [f"model.arch={arch}", "model.conditional=true", f"model.num_classes={classes}"])
    torch.manual_seed(0)
    return build_pair(config.model)


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_both_networks_depend_on_the_class_and_d_projects_it(arch):
    generator, discriminator = conditional_model(arch)
    z = torch.randn(8, 100)
    threes, fives = torch.full((8,), 3), torch.full((8,), 5)
    generator.train()
    assert not torch.allclose(generator(z, threes), generator(z, fives))
    x = generate(generator, z, threes)
    # D(x, y) = psi(phi(x)) + <embed(y), sum_hw phi(x)> (Miyato & Koyama 2018): the class term
    # is the whole difference between two classes' logits.
    discriminator.eval()
    features = discriminator.net[:-1](x)
    expected = projection(discriminator.embed, features, threes) - projection(discriminator.embed, features, fives)
    torch.testing.assert_close(discriminator(x, threes) - discriminator(x, fives), expected)
    assert expected.abs().min() > 0
    with pytest.raises(ValueError, match="class-conditional"):
        generator(z)
    with pytest.raises(ValueError, match="class-conditional"):
        discriminator(x)


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_an_unconditional_network_keeps_its_state_dict_keys(arch):
    """Checkpoints and exports made before conditioning existed load as they did."""
    old_keys = {
        "dcgan": ["net.0.weight", "net.1.weight", "net.1.bias", "net.1.running_mean"],
        "mlp": ["net.0.weight", "net.0.bias", "net.2.weight", "net.4.bias"],
    }[arch]
    generator = build_generator(arch, 32, 1, 100, 16)
    assert set(old_keys) <= set(generator.state_dict()) and generator.num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        generator(torch.randn(2, 100), torch.zeros(2, dtype=torch.long))


def test_labels_are_class_balanced_for_every_chunking():
    assert class_labels(0, 5) is None
    assert class_labels(3, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert class_labels(10, 4, start=8).tolist() == [8, 9, 0, 1]
    assert class_labels(10, 3, chosen=7).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="outside this generator's classes 0-9"):
        class_labels(10, 3, chosen=10)
    with pytest.raises(ValueError, match="unconditional"):
        class_labels(0, 3, chosen=1)


def test_fid_samples_every_class_equally():
    """FID during training and `eval` draw image i as class i mod C, whatever the chunking."""
    generator, _ = conditional_model("dcgan")
    seen = []
    forward = generator.forward

    def recording(z, labels=None):
        seen.append(labels.clone())
        return forward(z, labels)

    generator.forward = recording
    indices = torch.cat([i for i, _ in _generated_batches(generator, 95, 20, seed=0)])
    labels = torch.cat(seen)
    assert indices.tolist() == list(range(95)) and labels.tolist() == [i % 10 for i in range(95)]


def test_a_conditional_trainer_takes_its_classes_from_the_manifest(dist_single, mnist_shards, tmp_path):
    config = load_config(None, train_overrides(mnist_shards, tmp_path, "model.conditional=true"))
    trainer = Trainer(config, dist_single, tmp_path / "run")
    assert config.model.num_classes is None and trainer.config.model.num_classes == 10
    assert trainer.g_engine.module.num_classes == 10 and trainer.d_engine.module.embed.num_embeddings == 10
    losses = step_losses(trainer, trainer.loader.forever(), 2)
    assert all(np.isfinite(losses).ravel())
    path = trainer.save_checkpoint()
    generator, payload = load_generator(path)
    assert payload["model"]["num_classes"] == 10 and generator.num_classes == 10

    wrong = load_config(None, train_overrides(mnist_shards, tmp_path, "model.conditional=true", "model.num_classes=7"))
    with pytest.raises(UserError, match="model.num_classes is 7 but data .* has 10 classes"):
        Trainer(wrong, dist_single, tmp_path / "run2")


def test_a_dataset_without_labels_is_refused_in_one_line(dist_single, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.data.prepare import Transform, prepare

    make_npz(tmp_path / "digits.npz", 64, side=32)
    prepare(str(tmp_path / "digits.npz"), tmp_path / "shards", Transform(32, 1), use_labels=False, progress=False)
    unlabelled = load_config(None, train_overrides(tmp_path / "shards", tmp_path, "model.conditional=true"))
    with pytest.raises(UserError, match=r"model.conditional needs class labels and data .* has none"):
        Trainer(unlabelled, dist_single, tmp_path / "run")
    assert main(["train", *train_overrides(tmp_path / "shards", tmp_path, "model.num_classes=10")]) == 2
    assert (
        "model.num_classes is for class-conditional training: set model.conditional: true too"
        in capsys.readouterr().err
    )


MLFLOW_DRAWS_A_CLASS = """
import json, sys
import mlflow, numpy as np, torch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
sevens = model.predict(np.c_[z, np.full(4, 7)].astype(np.float32))
twos = model.predict(np.c_[z, np.full(4, 2)].astype(np.float32))
module = mlflow.pytorch.load_model(sys.argv[2])
with torch.no_grad():
    again = module(torch.from_numpy(np.c_[z, np.full(4, 7)].astype(np.float32))).numpy()
print(json.dumps({"shape": list(sevens.shape), "differ": float(np.abs(sevens - twos).mean()),
                  "same": float(np.abs(sevens - again).max()), "input": model.metadata.metadata["input"],
                  "columns": model.metadata.get_input_schema().inputs[0].shape[1]}))
"""


@pytest.mark.slow
def test_a_conditional_run_end_to_end(mnist_shards, tmp_path, capsys):
    """Train through the CLI (grids with a row per class, the MLflow model with the class
    column), then `sample --class` and `export --class` from the run (in-process: each would
    otherwise pay ~3 s of imports)."""
    from pipeline.cli import main

    def cli(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = train_overrides(
        mnist_shards, tmp_path, "model.conditional=true", "train.steps=2", "train.run_name=c",
        "train.sample_count=30", "tracking.log_model=true", f"tracking.uri={store}",
    )  # fmt: skip
    trained = run_cli("train", *overrides, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "c"
    grid = Image.open(run_dir / "samples" / "step_0000000.png")
    assert grid.size == (3 * 34 + 2, 10 * 34 + 2)  # 10 rows (classes) of 3 latents, 32 px + 2 px padding

    code, out, err = cli("sample", "--checkpoint", run_dir, "--n", 6, "--class", 4, "--out", tmp_path / "4.png")
    assert code == 0 and "6 samples of class 4" in out, err
    code, _, err = cli("sample", "--checkpoint", run_dir, "--class", 10, "--out", tmp_path / "x.png")
    assert code == 2 and "class 10 is outside this generator's classes 0-9" in err
    assert cli("export", "--checkpoint", run_dir, "--class", 4, "--out", tmp_path / "g4.pt")[0] == 0
    code, out, _ = cli("sample", "--checkpoint", tmp_path / "g4.pt", "--n", 6, "--out", tmp_path / "e.png")
    assert code == 0 and "6 samples of class 4" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "4.png")), np.asarray(Image.open(tmp_path / "e.png")))

    model_uri = next(line for line in trained.stderr.splitlines() if "mlflow.pytorch.load_model" in line)
    model_uri = model_uri.split("load_model('")[1].split("')")[0]
    loaded = subprocess.run(
        [sys.executable, "-c", MLFLOW_DRAWS_A_CLASS, store, model_uri],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=child_env({"PYTHONPATH": ""}),
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    drawn = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert drawn["shape"] == [4, 1, 32, 32] and drawn["columns"] == 101
    assert drawn["differ"] > 1e-3 and drawn["same"] < 1e-5  # the class column decides what is drawn
    assert "then the class (0-9)" in drawn["input"]

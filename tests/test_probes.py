"""Probes: bad inputs and damaged files, every command, every file format we write.

Each probe runs one command in this process (`pipeline.cli.main`, the code `python -m
pipeline` runs) and asserts what a user must see: its exit code, one message naming the
problem, no traceback, and nothing lost (every file that was there before is there after,
unchanged, unless the command's job is to write it). Read-only commands create nothing.

The probes are grown from classes, not single cases: a config or number that cannot work;
a file of ours damaged, incomplete or foreign (manifest, meta.json, the JSON-lines logs,
weight files, exports); a run folder that holds work; an output that cannot be written."""

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import REPO, train_overrides

CONFIG = str(REPO / "configs/mnist32.yaml")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, mnist_shards, dist_single):
    """A run folder of 2 steps with a checkpoint, records and an export (trained once)."""
    root = tmp_path_factory.mktemp("probe-runs")
    overrides = train_overrides(mnist_shards, root, "tracking.enabled=false", "train.run_name=done", "train.steps=2")
    assert main(["train", "--config", CONFIG, *overrides]) == 0
    return root / "runs" / "done"


@dataclass
class Space:
    """A probe's workspace: copies of the shards and the finished run it may damage."""

    root: Path
    shards: Path
    run: Path

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "step_0000002"

    def train(self, *overrides: str) -> list[str]:
        small = train_overrides(self.shards, self.root, "tracking.enabled=false")
        return ["train", "--config", CONFIG, *small, *overrides]

    def edit_json(self, path: Path, change: Callable[[dict], None]) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


def bomb(space: Space) -> Path:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    path = space.root / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def code_pickle(space: Space) -> Path:
    class Shell:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    import torch

    path = space.root / "evil.pt"
    torch.save({"format": "x", "payload": Shell()}, path)
    return path


def export_with(space: Space, change: Callable[[dict], None]) -> Path:
    import torch

    out = space.root / "g.pt"
    assert main(["export", "--checkpoint", str(space.checkpoint), "--out", str(out)]) == 0
    payload = torch.load(out, weights_only=True)
    change(payload)
    torch.save(payload, out)
    return out


def torn_checkpoint_file(space: Space, name: str) -> Path:
    path = space.checkpoint / name
    path.write_bytes(path.read_bytes()[:100])
    return space.checkpoint


def records(space: Space, name: str, text: str) -> Path:
    (space.run / name).write_text(text)
    return space.run


def no_latest_link(space: Space) -> list[str]:
    (space.run / "checkpoints" / "latest").unlink()
    shutil.move(space.run, space.root / "runs" / "done")
    return space.train("train.run_name=done")


def manifest(space: Space, change: Callable[[dict], None]) -> Path:
    space.edit_json(space.shards / "manifest.json", change)
    return space.shards


# (id, argv from the workspace, exit code, what the message must say)
PROBES = [
    # -- config: keys, types, ranges, cross-field rules, YAML ------------------------------
    ("unknown-key", lambda s: s.train("data.batchsize=8"), 2, r"data\.batchsize.*(did you mean|unknown|not a)"),
    ("wrong-type", lambda s: s.train("data.batch_per_rank=abc"), 2, r"data\.batch_per_rank"),
    ("zero-batch", lambda s: s.train("data.batch_per_rank=0"), 2, r"data\.batch_per_rank"),
    ("seed-64-bit", lambda s: s.train("seed=18446744073709551616"), 2, r"seed"),
    ("seed-negative", lambda s: s.train("seed=-1"), 2, r"seed"),
    ("steps-65-bit", lambda s: s.train("train.steps=36893488147419103232"), 2, r"does not fit in a 64-bit integer"),
    ("betas-huge", lambda s: s.train("train.g_optim.betas=[0.5, 99999999999999999999]"), 2, r"train\.g_optim\.betas"),
    ("registry-slash", lambda s: s.train("tracking.registered_model=team/dcgan"), 2, r"not an MLflow model name"),
    ("registry-colon", lambda s: s.train("tracking.registered_model=a:b"), 2, r"not an MLflow model name"),
    ("registry-dots", lambda s: s.train("tracking.registered_model=../x"), 2, r"not an MLflow model name"),
    ("parent-run-name", lambda s: s.train("tracking.parent_run=a/b"), 2, r"tracking\.parent_run"),
    ("precision", lambda s: s.train("deepspeed.precision=fp8"), 2, r"deepspeed\.precision"),
    ("fp16-zero0", lambda s: s.train("deepspeed.precision=fp16", "deepspeed.zero_stage=0"), 2, r"zero_stage"),
    ("n-generated", lambda s: s.train("eval.n_generated=-3"), 2, r"eval\.n_generated"),
    ("steps-zero", lambda s: s.train("train.steps=0"), 2, r"train\.steps"),
    ("lr-negative", lambda s: s.train("train.g_optim.lr=-1"), 2, r"train\.g_optim\.lr"),
    ("lr-infinite", lambda s: s.train("train.d_optim.lr=.inf"), 2, r"train\.d_optim\.lr.*finite"),
    ("r1-nan", lambda s: s.train("loss.r1_gamma=.nan"), 2, r"loss\.r1_gamma.*finite"),
    ("override-no-equals", lambda s: s.train("data.batch_per_rank"), 2, r"expected KEY=VALUE"),
    ("override-empty-segment", lambda s: s.train("data..x=1"), 2, r"empty key segment"),
    ("override-bad-yaml", lambda s: s.train("data.shards=[unclosed"), 2, r"not valid YAML"),
    ("alias-bomb", lambda s: ["train", "--config", str(bomb(s))], 2, r"aliases expand to more than"),
    (
        "alias-bomb-override",
        lambda s: s.train("tracking.tags={" + bomb(s).read_text().replace("\n", ", ") + "}"),
        2,
        r"override tracking\.tags: its YAML aliases expand to more than",
    ),
    ("config-missing", lambda s: ["train", "--config", str(s.root / "none.yaml")], 2, r"config file not found"),
    ("config-not-yaml", lambda s: ["train", "--config", str(write(s, "c.yaml", "a: [\n"))], 2, r"not valid YAML"),
    ("config-a-list", lambda s: ["train", "--config", str(write(s, "c.yaml", "- 1\n"))], 2, r"expected a mapping"),
    # -- numbers at the command line ------------------------------------------------------
    ("prepare-limit", lambda s: ["prepare", "mnist", str(s.root / "o"), "--limit", "-5"], 2, r"--limit"),
    ("prepare-workers", lambda s: ["prepare", "mnist", str(s.root / "o"), "--workers", "-1"], 2, r"--workers"),
    ("prepare-resolution", lambda s: ["prepare", "mnist", str(s.root / "o"), "--resolution", "0"], 2, r"--resolution"),
    (
        "prepare-shard-size",
        lambda s: ["prepare", "mnist", str(s.root / "o"), "--samples-per-shard", "0"],
        2,
        r"per-shard",
    ),
    ("prepare-quality", lambda s: ["prepare", "mnist", str(s.root / "o"), "--quality", "101"], 2, r"--quality"),
    ("prepare-val", lambda s: ["prepare", "mnist", str(s.root / "o"), "--val-fraction", "1.5"], 2, r"--val-fraction"),
    ("eval-n-gen-negative", lambda s: ["eval", "--checkpoint", str(s.run), "--n-gen", "-3"], 2, r"--n-gen"),
    ("eval-n-gen-zero", lambda s: ["eval", "--checkpoint", str(s.run), "--n-gen", "0"], 2, r"--n-gen"),
    ("eval-n-ref", lambda s: ["eval", "--checkpoint", str(s.run), "--n-ref", "-5"], 2, r"--n-ref"),
    (
        "sample-n",
        lambda s: ["sample", "--checkpoint", str(s.run), "--n", "0", "--out", str(s.root / "g.png")],
        2,
        "--n",
    ),
    ("sample-seed", lambda s: ["sample", "--checkpoint", str(s.run), "--seed", "-1", "--out", "x.png"], 2, r"--seed"),
    ("stream-epochs", lambda s: ["stream", "--epochs", "-1", f"data.shards={s.shards}"], 2, r"--epochs"),
    # -- outputs that cannot be written: refused before any work ---------------------------
    (
        "sample-out-folder-missing",
        lambda s: ["sample", "--checkpoint", str(s.run), "--out", "/no/such/g.png"],
        2,
        "/no/such",
    ),
    (
        "export-out-folder-missing",
        lambda s: ["export", "--checkpoint", str(s.run), "--out", "/no/such/g.pt"],
        2,
        "/no/such",
    ),
    ("export-out-is-folder", lambda s: ["export", "--checkpoint", str(s.run), "--out", str(s.root)], 2, r"is a folder"),
    (
        "eval-out-folder-missing",
        lambda s: ["eval", "--checkpoint", str(s.run), "--out", "/no/such/f.json"],
        2,
        "/no/such",
    ),
    # -- our manifest, incomplete or damaged -----------------------------------------------
    (
        "manifest-no-resolution",
        lambda s: ["stream", f"data.shards={manifest(s, lambda m: m.pop('resolution'))}"],
        2,
        r"lacks the field 'resolution'",
    ),
    (
        "manifest-count-text",
        lambda s: ["stream", f"data.shards={manifest(s, lambda m: m.update(count='many'))}"],
        2,
        r"field 'count' should be int",
    ),
    (
        "manifest-no-shards",
        lambda s: ["stream", f"data.shards={manifest(s, lambda m: m['splits']['train'].pop('shards'))}"],
        2,
        r"split 'train' lists no shards",
    ),
    (
        "manifest-shard-no-name",
        lambda s: ["stream", f"data.shards={manifest(s, drop_shard_name)}"],
        2,
        r"lacks the field 'name'",
    ),
    (
        "manifest-not-json",
        lambda s: ["stream", f"data.shards={write(s, 'shards/manifest.json', '{').parent}"],
        2,
        r"not valid JSON",
    ),
    (
        "manifest-foreign",
        lambda s: ["stream", f"data.shards={manifest(s, lambda m: m.update(format='x'))}"],
        2,
        r"not a gan-pipeline-shards/1 manifest",
    ),
    ("manifest-missing", lambda s: ["stream", f"data.shards={s.root / 'nothing'}"], 2, r"unreachable: .*nothing"),
    (
        "reencode-no-resolution",
        lambda s: ["prepare", str(manifest(s, lambda m: m.pop("resolution"))), str(s.root / "o")],
        2,
        r"lacks the field 'resolution'",
    ),
    ("shards-a-text-file", lambda s: ["stream", f"data.shards={write(s, 'notes.txt', 'hello')}"], 2, r"notes\.txt"),
    ("fid-reference-missing", lambda s: s.train("eval.fid_every=1", f"eval.reference={s.root / 'none'}"), 2, r"none"),
    ("split-unknown", lambda s: ["stream", f"data.shards={s.shards}", "data.split=test"], 2, r"has no split 'test'"),
    # -- our checkpoint files --------------------------------------------------------------
    (
        "meta-no-config",
        lambda s: ["export", "--checkpoint", str(meta(s, "config")), "--out", str(s.root / "g.pt")],
        2,
        r"lacks the field 'config'",
    ),
    (
        "meta-no-step",
        lambda s: ["sample", "--checkpoint", str(meta(s, "step")), "--out", str(s.root / "g.png")],
        2,
        r"lacks the field 'step'",
    ),
    (
        "meta-not-json",
        lambda s: [
            "export",
            "--checkpoint",
            str(write_in(s.checkpoint, "meta.json", "{")),
            "--out",
            str(s.root / "g.pt"),
        ],
        2,
        r"meta\.json is damaged",
    ),
    (
        "meta-foreign",
        lambda s: [
            "export",
            "--checkpoint",
            str(write_in(s.checkpoint, "meta.json", "{}")),
            "--out",
            str(s.root / "g.pt"),
        ],
        2,
        r"not a gan-pipeline checkpoint",
    ),
    (
        "ema-torn",
        lambda s: ["sample", "--checkpoint", str(torn_checkpoint_file(s, "ema.pt")), "--out", str(s.root / "g.png")],
        2,
        r"ema\.pt is damaged",
    ),
    (
        "not-a-checkpoint",
        lambda s: ["export", "--checkpoint", str(s.shards), "--out", str(s.root / "g.pt")],
        2,
        r"not a complete checkpoint \(no meta\.json\)",
    ),
    (
        "generator-missing",
        lambda s: ["sample", "--checkpoint", str(s.root / "none.pt"), "--out", "x.png"],
        2,
        r"not found",
    ),
    (
        "generator-code-pickle",
        lambda s: ["sample", "--checkpoint", str(code_pickle(s)), "--out", "x.png"],
        2,
        r"refused \(Trying to load unsupported GLOBAL posix\.system",
    ),
    (
        "generator-wrong-shape",
        lambda s: ["sample", "--checkpoint", str(export_with(s, wrong_shape)), "--out", str(s.root / "g.png")],
        2,
        r"g\.pt: its weights do not fit its model",
    ),
    (
        "generator-no-weights",
        lambda s: [
            "sample",
            "--checkpoint",
            str(export_with(s, lambda p: p.pop("state_dict"))),
            "--out",
            str(s.root / "g.png"),
        ],
        2,
        r"lacks the field 'state_dict'",
    ),
    (
        "generator-foreign",
        lambda s: [
            "sample",
            "--checkpoint",
            str(export_with(s, lambda p: p.update(format="x"))),
            "--out",
            str(s.root / "g.png"),
        ],
        2,
        r"not a gan-pipeline generator export",
    ),
    # -- a run folder that holds work is never overwritten ---------------------------------
    ("run-folder-no-latest-link", no_latest_link, 2, r"already holds a run's work \(1 checkpoint folder"),
    ("run-folder-records-only", lambda s: only_records(s), 2, r"already holds a run's work \(metrics\.jsonl"),
    ("resume-missing", lambda s: s.train("--resume", str(s.root / "gone")), 2, r"not a complete checkpoint"),
    ("resume-auto-unnamed", lambda s: s.train("--resume", "auto"), 2, r"--resume auto needs a stable run folder"),
    ("resume-empty-run-folder", lambda s: s.train("--resume", str(empty_run(s))), 2, r"holds no complete checkpoint"),
    # -- the JSON-lines logs and sync-tracking --------------------------------------------
    ("sync-not-a-run", lambda s: ["sync-tracking", str(s.shards)], 2, r"is not a run folder"),
    (
        "sync-damaged-metrics",
        lambda s: ["sync-tracking", str(records(s, "metrics.jsonl", DAMAGED))],
        2,
        r"metrics\.jsonl: line 2 is damaged",
    ),
    (
        "sync-damaged-fid",
        lambda s: ["sync-tracking", str(records(s, "fid.jsonl", DAMAGED))],
        2,
        r"fid\.jsonl: line 2 is damaged",
    ),
    ("sync-no-server", lambda s: ["sync-tracking", str(s.run)], 2, r"did not answer"),
    # -- read-only commands against the wrong store ----------------------------------------
    (
        "runs-wrong-root",
        lambda s: ["runs", "compare", "x", "--run-root", str(s.root / "typo")],
        2,
        r"no tracking store",
    ),
    (
        "runs-no-server",
        lambda s: ["runs", "compare", "x", "--tracking-uri", "http://127.0.0.1:9"],
        2,
        r"did not answer",
    ),
    # -- sources ---------------------------------------------------------------------------
    ("prepare-source-missing", lambda s: ["prepare", str(s.root / "none"), str(s.root / "o")], 2, r"none"),
    ("prepare-into-existing", lambda s: ["prepare", "mnist", str(s.shards), "--limit", "8"], 2, r"--overwrite"),
    ("prepare-npz-truncated", lambda s: ["prepare", str(truncated_npz(s)), str(s.root / "o")], 2, r"cut\.npz"),
    ("stream-pipe-refused", lambda s: ["stream", "data.shards=pipe:cat x.tar"], 2, r"pipe"),
    ("eval-real-missing", lambda s: ["eval", "--real", str(s.shards), "--real", str(s.root / "none")], 2, r"none"),
]

DAMAGED = '{"step": 1, "loss_D": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss_D": 0.9}\n'


def write(space: Space, name: str, text: str) -> Path:
    path = space.root / name
    path.write_text(text)
    return path


def write_in(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def meta(space: Space, field: str) -> Path:
    space.edit_json(space.checkpoint / "meta.json", lambda m: m.pop(field))
    return space.checkpoint


def drop_shard_name(m: dict) -> None:
    m["splits"]["train"]["shards"][0].pop("name")


def wrong_shape(payload: dict) -> None:
    import torch

    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.zeros(3, 3)


def only_records(space: Space) -> list[str]:
    folder = space.root / "runs" / "kept"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss_D": 1.0}\n')
    return space.train("train.run_name=kept")


def empty_run(space: Space) -> Path:
    (space.root / "runs" / "e" / "checkpoints").mkdir(parents=True)
    return space.root / "runs" / "e"


def truncated_npz(space: Space) -> Path:
    import numpy as np

    np.savez(space.root / "ok.npz", images=np.zeros((20, 8, 8), np.uint8))
    path = space.root / "cut.npz"
    path.write_bytes((space.root / "ok.npz").read_bytes()[:300])
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
def test_probe(probe, tmp_path, mnist_shards, finished_run, capsys, monkeypatch):
    name, argv_of, code, message = probe
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    space = Space(tmp_path, tmp_path / "shards", tmp_path / "run")
    shutil.copytree(mnist_shards, space.shards)
    shutil.copytree(finished_run, space.run)
    config = space.run / "config.yaml"  # sync-tracking reads the run's store from it: make it unreachable
    tree = yaml.safe_load(config.read_text())
    tree["tracking"] |= {"enabled": True, "uri": "http://127.0.0.1:9"}
    config.write_text(yaml.safe_dump(tree))
    (tmp_path / "runs").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    argv = argv_of(space)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        got = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusal: usage and one line, exit 2
        got = exc.code
    out, err = capsys.readouterr()
    assert got == code, (got, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert "weights_only` set to `False" not in err  # never torch's advice to run a refused file's code
    shown = [line for line in err.splitlines() if line.startswith(("error:", "usage:", "pipeline "))]
    assert shown, err[-3000:]
    assert re_search(message, err), (message, err[-2000:])
    after = snapshot(tmp_path)
    lost = {path for path, digest in before.items() if after.get(path) != digest}
    assert not lost, f"{name} changed or removed {sorted(lost)}"
    created = set(after) - set(before)
    assert not created, f"{name} created {sorted(created)}"


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_there_are_at_least_sixty_probes_and_their_names_are_unique():
    names = [p[0] for p in PROBES]
    assert len(names) >= 60 and len(set(names)) == len(names)

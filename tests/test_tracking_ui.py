"""End to end in a real browser: Debian's Chromium, driven headless by Playwright from a fresh
profile, goes where a user goes in the MLflow UI. From the UI's root: one click on "Model
training" (MLflow 3.17 opens experiments on its GenAI overview until that switch is set, and
remembers it in the browser), then the experiment: its runs table shows the sweep and, inside
it, two runs whose names tell them apart; their compare view; one run's chart sections and its
samples card, a grid at the first step; the experiment's logged models with their registered
versions; the registered model with its versions and the `best` alias.

With PIPELINE_UI_SCREENSHOTS=DIR set, the screenshots are also written there (docs/images/)."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, train_overrides

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_mlflow_ui_from_its_root_shows_runs_apart_charts_samples_compare_and_registered_models(
    mnist_shards, tmp_path, mlflow_server
):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (tests/run.sh installs it as root)")
        pytest.skip("Debian's chromium is not installed (tests/run.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    sweep = ["tracking.parent_run=ui-sweep", "tracking.log_model=true", "tracking.registered_model=ui-gen"]
    fid = ["eval.fid_every=2", "eval.n_generated=12", "eval.n_reference=16", "eval.batch_size=8", "eval.kid=false"]
    fid += ["eval.reference=null", "eval.floor=null"]  # the training shards: the config's test set is not made here
    runs = {}  # run name -> id; the names are made from the config and the overrides (no train.run_name)
    for lever, extra in (
        ("train.g_optim.lr=1e-3", ["train.steps=4", *fid]),
        ("train.g_optim.lr=4e-4", ["train.steps=2"]),
    ):
        overrides = train_overrides(mnist_shards, tmp_path, "train.sample_every=2", *sweep, *extra)
        result = run_cli(
            "train",
            "--config",
            REPO / "configs/mnist32.yaml",
            lever,  # first, as a user types the one lever a run changes
            *overrides,
            env={"MLFLOW_TRACKING_URI": mlflow_server.url},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
        run_id = json.loads(summary)["mlflow_run_id"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_server.url)
        runs[client.get_run(run_id).info.run_name] = run_id
    scored_name, other_name = list(runs)
    assert scored_name.startswith("mnist32 g_optim.lr=1e-3") and other_name.startswith("mnist32 g_optim.lr=4e-4")
    best = client.get_model_version_by_alias("ui-gen", "best").version  # v1 or v2: the scored run's, step 2 or 4
    shots = [Path(os.environ["PIPELINE_UI_SCREENSHOTS"])] if os.environ.get("PIPELINE_UI_SCREENSHOTS") else []
    shots.append(tmp_path)

    def screenshot(page, name: str, **options) -> None:
        for folder in shots:
            page.screenshot(path=str(folder / f"{name}.png"), **options)

    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary profile itself (no --user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{mlflow_server.url}/", timeout=60_000)
            page.get_by_text("Model training", exact=True).first.click(timeout=60_000)  # the one click (docs)
            page.get_by_role("link", name="dcgan", exact=True).first.click(timeout=60_000)
            page.wait_for_url(re.compile(r".*/experiments/\d+/runs\b.*"), timeout=60_000)  # the runs, not GenAI
            page.get_by_role("link", name="ui-sweep", exact=True).first.wait_for(timeout=60_000)
            parent = page.get_by_role("row").filter(has=page.get_by_role("link", name="ui-sweep", exact=True))
            parent.locator("button").first.click(timeout=30_000)  # unfold the sweep's children
            for name in runs:
                page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=30_000)
            screenshot(page, "mlflow_runs_table")
            # The compare view of the two runs.
            for name in runs:
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
                row.locator("input.ag-checkbox-input").first.check(force=True, timeout=30_000)
            page.get_by_role("button", name="Compare", exact=True).click(timeout=30_000)
            page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for(timeout=60_000)
            for name in runs:
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            # One run's charts: a section per prefix (pipeline/metric_names.py), not one flat list.
            # Tall enough that the image cards below the metric charts render (they load lazily).
            page.set_viewport_size({"width": 1600, "height": 4000})
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_of(client, runs)}/runs/{runs[scored_name]}")
            page.get_by_text("Model metrics", exact=True).first.click(timeout=60_000)
            page.get_by_text("loss_D", exact=True).first.wait_for(timeout=60_000)
            for section in ("train", "eval", "perf", "data"):
                page.get_by_text(re.compile(rf"^{section}\s*\(\d+\)$")).first.wait_for(timeout=30_000)
            # The image card opens on its first step, 0: a grid is logged there (the untrained G),
            # so it never opens on "No image logged at this step". Then the last step, as a user would.
            card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
                has=page.locator("h4[title='samples']")
            )
            card.scroll_into_view_if_needed(timeout=60_000)
            assert card.get_by_role("slider").get_attribute("aria-valuenow") == "0"
            wait_for_image(page, card)
            assert card.get_by_text("No image logged at this step").count() == 0
            track = card.locator(".TRACK").bounding_box()
            page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
            assert card.get_by_role("slider").get_attribute("aria-valuenow") == "4"
            wait_for_image(page, card)
            page.set_viewport_size({"width": 1600, "height": 1600})
            page.evaluate("window.scrollTo(0, 0)")
            screenshot(page, "mlflow_run_charts")
            # The experiment's logged models, each naming its registered version.
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_of(client, runs)}/models", timeout=60_000)
            for version in (1, 2, 3):  # the "Registered models" column: a link to the version
                page.locator(f"a[href='#/models/ui-gen/versions/{version}']").first.wait_for(timeout=60_000)
            screenshot(page, "mlflow_logged_models")
            # The registered model: three versions (two of the scored run, one of the other), `best` on one.
            page.goto(f"{mlflow_server.url}/#/models/ui-gen", timeout=60_000)
            for version in (1, 2, 3):
                page.get_by_role("link", name=f"Version {version}", exact=True).wait_for(timeout=60_000)
            aliased = page.get_by_role("row").filter(has_text="@ best")
            aliased.first.wait_for(timeout=30_000)
            assert aliased.count() == 1
            assert aliased.get_by_role("link", name=f"Version {best}", exact=True).count() == 1
            screenshot(page, "mlflow_registry")
        finally:
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "mlflow_ui_last.png"), full_page=True)
            (Path(tempfile.gettempdir()) / "mlflow_ui_last.html").write_text(page.content())
            browser.close()


def experiment_of(client, runs: dict) -> str:
    return client.get_run(next(iter(runs.values()))).info.experiment_id


def wait_for_image(page, card) -> None:
    image = card.locator("img").first
    image.wait_for(timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=30_000)

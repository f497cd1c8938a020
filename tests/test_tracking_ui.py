"""End to end in a real browser: Debian's Chromium, driven headless by Playwright, goes from the
experiment page of a finished sweep in the MLflow UI to its parent run, sees the children,
opens one and sees its loss charts and a sample image; then opens the registered model and
sees its versions and the `best` alias."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.tracking import UI_MODEL_TRAINING
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


def test_mlflow_ui_shows_the_sweep_loss_charts_sample_images_and_the_registered_model(
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
    run_ids = []
    for name, extra in (("ui", ["train.steps=4", *fid]), ("ui2", ["train.steps=2"])):
        result = run_cli(
            "train",
            "--config",
            REPO / "configs/mnist32.yaml",
            *train_overrides(mnist_shards, tmp_path, "train.sample_every=2", f"train.run_name={name}", *sweep, *extra),
            env={"MLFLOW_TRACKING_URI": mlflow_server.url},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
        run_ids.append(json.loads(summary)["mlflow_run_id"])
    run_id = run_ids[0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.get_run(run_id).info.experiment_id
    best = client.get_model_version_by_alias("ui-gen", "best").version  # v1 or v2: run ui's, at step 2 or 4
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary profile itself (no --user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            # Tall enough that the image cards below the 16 metric charts render (they load lazily).
            page = browser.new_page(viewport={"width": 1600, "height": 4000})
            # As a user arrives: the experiment's page as our links give it, which opens on its runs
            # (not on MLflow 3's GenAI overview) and lists the sweep's parent run; the parent's page
            # names its children; then a child run, then its "Model metrics" tab.
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}?{UI_MODEL_TRAINING}", timeout=60_000)
            page.get_by_role("link", name="ui-sweep", exact=True).first.click(timeout=60_000)
            page.get_by_text("Child runs", exact=True).first.wait_for(timeout=60_000)
            page.get_by_role("link", name="ui2", exact=True).first.wait_for(timeout=30_000)
            page.get_by_role("link", name="ui", exact=True).first.click(timeout=30_000)
            page.wait_for_url(f"**/runs/{run_id}**", timeout=60_000)
            page.get_by_text("Model metrics", exact=True).first.click(timeout=60_000)
            page.get_by_text("loss_D", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("loss_G", exact=True).first.wait_for(timeout=30_000)
            # One chart section per prefix (pipeline/metric_names.py), not one flat list.
            for section in ("train", "eval", "perf", "data"):
                page.get_by_text(re.compile(rf"^{section}\s*\(\d+\)$")).first.wait_for(timeout=30_000)
            # The image card opens on its first step, 0: a grid is logged there (the untrained G),
            # so it never opens on "No image logged at this step". Then the last step, as a user would.
            card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
                has=page.locator("h4[title='samples']")
            )
            card.scroll_into_view_if_needed(timeout=60_000)
            assert card.get_by_role("slider").get_attribute("aria-valuenow") == "0"
            first = card.locator("img").first
            first.wait_for(timeout=60_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=first.element_handle(), timeout=30_000
            )
            assert card.get_by_text("No image logged at this step").count() == 0
            track = card.locator(".TRACK").bounding_box()
            page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
            assert card.get_by_role("slider").get_attribute("aria-valuenow") == "4"
            image = card.locator("img").first
            image.wait_for(timeout=60_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=30_000
            )
            page.screenshot(path=str(tmp_path / "mlflow_ui.png"), full_page=True)
            # The registered model: three versions (two of run ui, scored; one of ui2), `best` on one.
            page.goto(f"{mlflow_server.url}/#/models/ui-gen", timeout=60_000)
            for version in (1, 2, 3):
                page.get_by_role("link", name=f"Version {version}", exact=True).wait_for(timeout=60_000)
            aliased = page.get_by_role("row").filter(has_text="@ best")
            aliased.first.wait_for(timeout=30_000)
            assert aliased.count() == 1
            assert aliased.get_by_role("link", name=f"Version {best}", exact=True).count() == 1
        finally:
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "mlflow_ui_last.png"), full_page=True)
            (Path(tempfile.gettempdir()) / "mlflow_ui_last.html").write_text(page.content())
            browser.close()

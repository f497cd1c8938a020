"""End to end in a real browser: Debian's Chromium, driven headless by Playwright, goes from a
finished run's experiment page in the MLflow UI to the run and sees the loss charts and a
sample image."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.tracking import UI_MODEL_TRAINING
from tests.conftest import REPO, run_cli, train_overrides

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


def test_mlflow_ui_shows_loss_charts_and_sample_images(mnist_shards, tmp_path, mlflow_server):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (tests/run.sh installs it as root)")
        pytest.skip("Debian's chromium is not installed (tests/run.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    result = run_cli(
        "train",
        "--config",
        REPO / "configs/mnist32.yaml",
        *train_overrides(mnist_shards, tmp_path, "train.steps=4", "train.sample_every=2", "train.run_name=ui"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(mlflow_server.url).get_run(run_id).info.experiment_id
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary profile itself (no --user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            # Tall enough that the image cards below the 16 metric charts render (they load lazily).
            page = browser.new_page(viewport={"width": 1600, "height": 4000})
            # As a user arrives: the experiment's page as our links give it, which opens on its runs
            # (not on MLflow 3's GenAI overview); then the run, then its "Model metrics" tab.
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}?{UI_MODEL_TRAINING}", timeout=60_000)
            page.get_by_role("link", name="ui", exact=True).first.click(timeout=60_000)
            page.wait_for_url(f"**/runs/{run_id}**", timeout=60_000)
            page.get_by_text("Model metrics", exact=True).first.click(timeout=60_000)
            page.get_by_text("loss_D", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("loss_G", exact=True).first.wait_for(timeout=30_000)
            # The image card's step slider starts before the first logged step ("No image logged
            # at this step"): move it to the last step, as a user would, and see the grid.
            card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
                has=page.locator("h4[title='samples']")
            )
            card.scroll_into_view_if_needed(timeout=60_000)
            track = card.locator(".TRACK").bounding_box()
            page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
            assert card.get_by_role("slider").get_attribute("aria-valuenow") == "4"
            image = card.locator("img").first
            image.wait_for(timeout=60_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=30_000
            )
            page.screenshot(path=str(tmp_path / "mlflow_ui.png"), full_page=True)
        finally:
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "mlflow_ui_last.png"), full_page=True)
            (Path(tempfile.gettempdir()) / "mlflow_ui_last.html").write_text(page.content())
            browser.close()

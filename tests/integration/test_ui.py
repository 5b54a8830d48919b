"""The MLflow UI in a real browser: what the tutorial promises is on the page.

Headless Debian Chromium driven by Playwright, against a real `mlflow server` on a store with
two 3-epoch runs. Where Chromium is absent the tests skip, saying so; CI installs it and sets
DLHARNESS_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

import pytest
from mlflow.tracking import MlflowClient

from dlharness.store.server import running_server
from dlharness.training.train import train
from tests.conftest import make_store, repo_module, tiny_config

pytestmark = pytest.mark.slow

if os.environ.get("DLHARNESS_REQUIRE_BROWSER") != "1":
    pytest.importorskip("playwright", reason="playwright is not installed")
ui = repo_module("tools/mlflow_ui.py")
if ui.chromium_path() is None and os.environ.get("DLHARNESS_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium here (apt-get install chromium)", allow_module_level=True)

EPOCHS = 3


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two runs (lr 0.01 and 0.003) behind a real mlflow server: (url, experiment id, runs)."""
    folder = tmp_path_factory.mktemp("ui")
    uri = make_store(folder)
    runs = [
        train(tiny_config(uri, **{"trainer.max_epochs": EPOCHS, "optim.lr": lr}))
        for lr in (0.01, 0.003)
    ]
    names = [MlflowClient(uri).get_run(r.run_id).info.run_name for r in runs]
    with running_server(uri, folder / "artifacts") as (url, _), ui.browser() as chromium:
        yield url, runs[0].experiment_id, list(zip(runs, names, strict=True)), chromium


@pytest.fixture
def page(site):
    url, _, _, chromium = site
    browser_page = ui.MlflowUi.open(chromium, url)
    yield browser_page
    browser_page.page.close()


def test_run_page_charts_val_acc_at_steps_0_to_2(site, page):
    _, experiment_id, runs, _ = site
    page.run_charts(experiment_id, runs[0][0].run_id, "val/acc")
    card = page.chart_card("val/acc")
    [line, *_] = page.line_paths(card)
    assert ui.line_points(line) == EPOCHS
    ticks = card.locator("g.xtick text").evaluate_all("els => els.map(e => e.textContent)")
    assert ticks[0] == "0" and ticks[-1] == str(EPOCHS - 1)


def test_each_epochs_confusion_matrix_is_visible_through_the_step_slider(site, page):
    _, experiment_id, runs, _ = site
    answered: dict[str, int] = {}
    page.page.on(
        "response",
        lambda r: answered.__setitem__(unquote(r.url), r.status) if "get-artifact" in r.url else 0,
    )
    page.run_charts(experiment_id, runs[0][0].run_id, "val_confusion_matrix")
    card = page.chart_card("val_confusion_matrix")
    picture = card.locator("img[src*='val_confusion_matrix']")
    picture.wait_for()
    page.hide_run_parameters(card)
    slider = card.get_by_role("slider")
    for epoch in range(EPOCHS):
        if epoch:
            slider.press("ArrowRight")
        src = f"val_confusion_matrix+step+{epoch}+"
        card.locator(f"img[src*='{src.replace('+', '%2B')}']").wait_for()
        picture.evaluate("img => img.decode()")  # loaded and decodable
        box, frame = picture.bounding_box(), card.bounding_box()
        assert box["width"] > 100 and box["height"] > 100
        assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]
        assert box["y"] + box["height"] <= ui.VIEWPORT["height"]
        assert [s for u, s in answered.items() if src in u] == [200]


def test_two_selected_runs_compare_with_both_epoch_curves(site, page):
    _, experiment_id, runs, _ = site
    names = [name for _, name in runs]
    page.compare_metric(experiment_id, names, "val/acc")
    assert all(run.run_id in page.page.url for run, _ in runs)
    lines = set(page.line_paths())
    assert len(lines) == 2
    assert {ui.line_points(line) for line in lines} == {EPOCHS}
    # The table under the chart: each run's latest val/acc, at the last epoch.
    page.page.get_by_text("Latest", exact=True).wait_for()
    text = page.page.locator("body").inner_text()
    for name in names:
        assert re.search(rf"{name}\s+[0-9.e-]+ \(step={EPOCHS - 1}\)", text), text[-1500:]


def test_the_models_tab_lists_each_kept_checkpoint_with_its_val_acc(site, page):
    url, experiment_id, runs, _ = site
    table = page.models_table(experiment_id)
    client = MlflowClient(url)
    for run, name in runs:
        history = {m.step: m.value for m in client.get_metric_history(run.run_id, "val/acc")}
        [val] = [d.dataset for d in client.get_run(run.run_id).inputs.dataset_inputs
                 if d.tags[0].value == "val"]  # fmt: skip
        column = (
            f'metrics.{{"metricKey":"val/acc","datasetName":"{val.name}",'
            f'"datasetDigest":"{val.digest}"}}'
        )
        for epoch in range(EPOCHS):
            row = table[f"{name}-epoch-{epoch}"]
            assert row["status"] == "Ready"
            assert float(row[column]) == pytest.approx(history[epoch], rel=1e-6)
    checkpoints = [n for n in table if re.fullmatch(r".+-epoch-\d+", n)]
    assert len(checkpoints) == EPOCHS * len(runs)

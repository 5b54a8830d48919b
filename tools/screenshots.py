"""`make docs`: the tutorial's screenshots, docs/img/*.png, of real runs in a real MLflow UI.

It trains the tutorial's two runs (digits, 4 epochs, learning rates 0.01 and 0.003, the
second registered as `digits` and promoted to champion) into a temporary store, starts
`mlflow server` on loopback, and photographs the pages docs/tutorial.md walks through in
headless Chromium. Re-running it regenerates every picture.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from dlharness.serving.lifecycle import Registry
from dlharness.store.server import running_server
from dlharness.training.config import load_config
from dlharness.training.train import train

REPO = Path(__file__).resolve().parents[1]
# tools/ is not a package: its page driver is loaded from its file.
_spec = importlib.util.spec_from_file_location("mlflow_ui", REPO / "tools" / "mlflow_ui.py")
ui = importlib.util.module_from_spec(_spec)
sys.modules["mlflow_ui"] = ui
_spec.loader.exec_module(ui)
EXPERIMENT = "dlharness"
TAGS = {"author": "you", "description": "my first tracked run"}
EPOCHS = 4


def tutorial_runs(uri: str) -> list[str]:
    """The runs of the tutorial's commands, trained here: their run ids."""
    run_ids = []
    for lr, tags, register in ((0.01, TAGS, None), (0.003, {"author": "you"}, "digits")):
        cfg = load_config(
            REPO / "configs" / "default.yaml",
            {
                "tracking.tracking_uri": uri,
                "tracking.experiment": EXPERIMENT,
                "trainer.max_epochs": EPOCHS,
                "optim.lr": lr,
                "tracking.tags": tags,
                "tracking.register_model": register,
            },
        )
        run_ids.append(train(cfg).run_id)
    Registry(MlflowClient(uri)).promote("digits")
    return run_ids


def photograph(url: str, experiment_id: str, run_ids: list[str], names: list[str], out: Path):
    with ui.browser() as chromium:
        page = ui.MlflowUi.open(chromium, url)
        page.go(f"experiments/{experiment_id}/runs")
        page.close_assistant()
        page.page.get_by_text(names[0]).first.wait_for()
        page.screenshot(out / "runs-list.png")

        first = run_ids[0]
        page.go(f"experiments/{experiment_id}/runs/{first}")
        page.page.get_by_text("Parameters").first.wait_for()
        page.screenshot(out / "run-overview.png")

        page.run_charts(experiment_id, first, "val/")
        page.line_paths(page.chart_card("val/acc"))
        page.screenshot(out / "run-charts.png")

        page.run_charts(experiment_id, first, "val_confusion_matrix")
        card = page.chart_card("val_confusion_matrix")
        card.locator("img").first.wait_for()
        page.hide_run_parameters(card)
        for _ in range(EPOCHS - 1):  # to the last epoch's picture
            card.get_by_role("slider").press("ArrowRight")
        card.locator(f"img[src*='step%2B{EPOCHS - 1}%2B']").wait_for()
        page.screenshot(out / "confusion-matrix.png")

        page.go(f"experiments/{experiment_id}/runs/{first}/artifacts")
        page.page.get_by_text("plots", exact=True).first.click()
        page.page.get_by_text("loss_curves.png").first.click()
        # The preview shows the file as a blob: URL once it is downloaded.
        page.page.locator("img[src^='blob:']").first.wait_for()
        page.screenshot(out / "run-artifacts.png")

        page.compare_metric(experiment_id, names, "val/acc")
        page.line_paths()
        page.screenshot(out / "compare-val-acc.png")

        page.go(f"experiments/{experiment_id}/models?workflowType=machine_learning")
        page.page.get_by_text(f"{names[0]}-epoch-0").first.wait_for()
        page.screenshot(out / "models-tab.png")
        page.models_charts(experiment_id, "val/acc")
        page.page.locator(".js-plotly-plot, svg.main-svg").first.wait_for()
        page.screenshot(out / "models-val-acc.png")

        page.go("models/digits")
        page.page.get_by_text("champion").first.wait_for()
        page.screenshot(out / "registry.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dlharness-docs-") as scratch:
        folder = Path(scratch)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment_id = client.create_experiment(
            EXPERIMENT, artifact_location=(folder / "artifacts").as_uri()
        )
        run_ids = tutorial_runs(uri)
        names = [client.get_run(run_id).info.run_name for run_id in run_ids]
        with running_server(uri, folder / "artifacts") as (url, _):
            photograph(url, experiment_id, run_ids, names, args.out)
    print(f"screenshots written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

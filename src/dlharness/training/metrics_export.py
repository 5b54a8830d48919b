"""A finished run's metrics as files other tools read: DVC's metrics (JSON) and plots (CSV).

Read back from the run itself, so the files hold exactly the numbers MLflow holds.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

from dlharness.tracking.epoch_history import SYSTEM_PREFIX

# Stages whose metrics have a value per epoch (step = epoch); "test" has one, at the end.
EPOCH_STAGES = ("train", "val")


def _stage_metrics(client: MlflowClient, run_id: str) -> dict[str, dict[str, float]]:
    by_stage: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in client.get_run(run_id).data.metrics.items():
        stage, sep, name = key.partition("/")
        if sep and not key.startswith(SYSTEM_PREFIX):
            by_stage[stage][name] = value
    return dict(sorted(by_stage.items()))


def write_metrics_json(client: MlflowClient, run_id: str, path: Path) -> None:
    """`{"run_id": …, "test": {"acc": …}, "val": {…}, "train": {…}}`: each metric's last value."""
    document = {"run_id": run_id, **_stage_metrics(client, run_id)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def write_epoch_csvs(client: MlflowClient, run_id: str, folder: Path) -> list[Path]:
    """One CSV per stage (`train.csv`, `val.csv`): a row per epoch, a column per metric."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, latest in _stage_metrics(client, run_id).items():
        if stage not in EPOCH_STAGES:
            continue
        names = sorted(latest)
        rows: dict[int, dict[str, float]] = defaultdict(dict)
        for name in names:
            for metric in client.get_metric_history(run_id, f"{stage}/{name}"):
                rows[metric.step][name] = metric.value
        path = folder / f"{stage}.csv"
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["epoch", *names])
            writer.writeheader()
            for epoch in sorted(rows):
                writer.writerow({"epoch": epoch, **rows[epoch]})
        written.append(path)
    return written

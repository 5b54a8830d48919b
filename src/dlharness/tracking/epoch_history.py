"""Per-epoch metric values, sent to the run exactly once per (metric, epoch), and their curves."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dlharness.tracking import charts

LOSS_CURVES = "plots/loss_curves.png"
METRIC_CURVES = "plots/metric_curves.png"
# Metrics MLflow's system-metrics sampler logs: never epoch values.
SYSTEM_PREFIX = "system/"

History = dict[int, dict[str, float]]


class LoggedSteps:
    """Which (metric, step) pairs the run holds, so that nothing is sent twice.

    Values a run already holds are not sent again, and values missing from it (a process killed
    before they were sent) are sent from the history that travels in every checkpoint.
    """

    def __init__(self) -> None:
        self._steps: dict[str, set[int]] = {}

    def read(self, client: MlflowClient, run_id: str) -> None:
        keys = client.get_run(run_id).data.metrics
        self._steps = {
            key: {m.step for m in client.get_metric_history(run_id, key)}
            for key in keys
            if not key.startswith(SYSTEM_PREFIX)
        }

    def send(
        self, client: MlflowClient, run_id: str, epoch: int, values: Mapping[str, float]
    ) -> None:
        timestamp = int(time.time() * 1000)
        new = [
            Metric(key, value, timestamp, epoch)
            for key, value in sorted(values.items())
            if epoch not in self._steps.get(key, ())
        ]
        # MLflow takes at most 1000 metrics per batch.
        for start in range(0, len(new), 1000):
            client.log_batch(run_id, metrics=new[start : start + 1000])
        for metric in new:
            self._steps.setdefault(metric.key, set()).add(epoch)


def log_curves(client: MlflowClient, run_id: str, history: History) -> None:
    """The loss curves and the validation metrics' curves, drawn from the whole history."""
    with tempfile.TemporaryDirectory(prefix="dlharness-plots-") as scratch:
        for chart, artifact in (
            (charts.loss_chart(history), LOSS_CURVES),
            (charts.metric_chart(history), METRIC_CURVES),
        ):
            path = Path(scratch) / Path(artifact).name
            # Fastest zlib level: the files are ~3x larger, drawn 2x faster (≈4 ms saved).
            chart.save(path, format="PNG", compress_level=1)
            client.log_artifact(run_id, str(path), str(Path(artifact).parent))

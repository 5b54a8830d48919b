"""Per-epoch metric values, sent to the run exactly once per (metric, epoch), and their curves."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dlharness.tracking.pictures.files import LOSS_CURVES_FILE, METRIC_CURVES_FILE

PLOTS_DIR = "plots"
LOSS_CURVES = f"{PLOTS_DIR}/{LOSS_CURVES_FILE}"
METRIC_CURVES = f"{PLOTS_DIR}/{METRIC_CURVES_FILE}"
# Metrics MLflow's system-metrics sampler logs: never epoch values.
SYSTEM_PREFIX = "system/"

History = dict[int, dict[str, float]]
# MLflow takes at most 1000 metrics, params and tags together per `log_batch`; this leaves
# room for the tags a checkpoint sets in the same batch.
MAX_BATCH_METRICS = 990


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better: the losses."""
    return metric.endswith("loss")


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

    def unsent(self, epoch: int, values: Mapping[str, float]) -> list[Metric]:
        """The values of `epoch` the run does not hold yet, as metrics at ``step = epoch``."""
        timestamp = int(time.time() * 1000)
        return [
            Metric(key, value, timestamp, epoch)
            for key, value in sorted(values.items())
            if epoch not in self._steps.get(key, ())
        ]

    def mark_sent(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            self._steps.setdefault(metric.key, set()).add(metric.step)

    def send(
        self, client: MlflowClient, run_id: str, epoch: int, values: Mapping[str, float]
    ) -> None:
        new = self.unsent(epoch, values)
        for batch in metric_batches(new):
            client.log_batch(run_id, metrics=batch)
        self.mark_sent(new)


def metric_batches(metrics: list[Metric], room: int = MAX_BATCH_METRICS) -> list[list[Metric]]:
    """`metrics` in slices MLflow takes in one `log_batch`, the last with room for a few tags."""
    if not metrics:
        return []
    return [metrics[start : start + room] for start in range(0, len(metrics), room)]


def log_curve_files(client: MlflowClient, run_id: str, folder: Path) -> None:
    """The curve files `pictures.files.write_curves` wrote into `folder`, into ``plots/``."""
    for name in (LOSS_CURVES_FILE, METRIC_CURVES_FILE):
        client.log_artifact(run_id, str(folder / name), PLOTS_DIR)

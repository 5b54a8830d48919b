"""An Optuna trial's epochs reported to it, and a pruned trial stopped."""

from __future__ import annotations

import lightning as L
import optuna
from typing_extensions import override

from dlharness.callbacks.mlflow_tracking import MlflowTracking

# The trial's user attribute that names its MLflow run; a retry of a stale trial inherits it.
RUN_ATTR = "mlflow_run_id"


class EpochJudge(L.Callback):
    """Reports the sweep metric to the Optuna trial every epoch and stops a pruned trial at the
    end of that epoch, its run kept as logged.

    Args:
        trial: The Optuna trial the fit belongs to.
        metric: A per-epoch metric key, e.g. ``val/acc``.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.values: dict[int, float] = {}
        self.pruned_at: int | None = None
        self.run_id: str | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tracking = next((c for c in trainer.callbacks if isinstance(c, MlflowTracking)), None)
        if tracking is not None and tracking.logging:
            self.run_id = tracking.run.run_id
            # Stored before the first epoch: a worker that takes a stale trial over resumes it.
            self.trial.set_user_attr(RUN_ATTR, self.run_id)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        self.values[epoch] = float(value)
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True

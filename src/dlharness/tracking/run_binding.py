"""Which MLflow run a Lightning fit is tracked in, and ending the runs the tracking started."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from dlharness.tracking.interruption import TrainingInterrupted
from dlharness.tracking.redaction import redact
from dlharness.tracking.run_names import fresh_run_name

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_EXPERIMENT = "dlharness"
# Where a run came from; the tracking ends only the runs it started or reopened.
FROM_LOGGER, ACTIVE, CONTINUED, CREATED = "logger", "active", "continued", "created"


@dataclass(frozen=True)
class BoundRun:
    run_id: str
    tracking_uri: str
    source: str

    @property
    def owned(self) -> bool:
        """Whether the tracking ends this run (it started or reopened it)."""
        return self.source in (CONTINUED, CREATED)


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    from lightning.pytorch.loggers import MLFlowLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def bind_run(
    trainer: L.Trainer,
    run_id: str | None,
    tracking_uri: str | None,
    experiment_name: str | None,
    run_name: str | None,
    tags: Mapping[str, str] | None,
) -> BoundRun:
    """The run to log into: the Trainer's `MLFlowLogger`'s, else `run_id` (reopened), else the
    active fluent run, else a new one in the experiment `new_run_experiment` picks.

    Raises:
        ValueError: `run_id` names no run in the tracking store, or ``$MLFLOW_EXPERIMENT_ID``
            no experiment.
    """
    logger = mlflow_logger(trainer)
    if logger is not None:
        # `experiment` creates the logger's run if it has none yet; rank 0 only, like us.
        client = logger.experiment
        return BoundRun(logger.run_id, client.tracking_uri, FROM_LOGGER)
    if run_id is not None:
        uri = tracking_uri or mlflow.get_tracking_uri()
        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"MlflowTracking: run {run_id} not found in {uri}") from None
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return BoundRun(run_id, uri, CONTINUED)
    active = mlflow.active_run()
    if active is not None:
        return BoundRun(active.info.run_id, mlflow.get_tracking_uri(), ACTIVE)
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    # resolve_tags adds what MLflow's own start_run records: user, source, git commit.
    run = client.create_run(
        new_run_experiment(client, experiment_name),
        run_name=run_name or fresh_run_name(),
        tags=resolve_tags(redact(dict(tags or {}))),
    )
    return BoundRun(run.info.run_id, uri, CREATED)


def new_run_experiment(client: MlflowClient, experiment_name: str | None) -> str:
    """The id of the experiment a new run goes to: `experiment_name` if given, else the one
    `mlflow.set_experiment` made active (it sets ``$MLFLOW_EXPERIMENT_ID``, which a launcher
    may also have set), else ``$MLFLOW_EXPERIMENT_NAME`` (created if missing), else
    ``dlharness``."""
    if experiment_name:
        return _experiment_id(client, experiment_name)
    if chosen := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        try:
            return client.get_experiment(chosen).experiment_id
        except MlflowException:
            raise ValueError(
                f"MlflowTracking: MLFLOW_EXPERIMENT_ID={chosen} names no experiment in "
                f"{client.tracking_uri}; unset it, or pass experiment_name"
            ) from None
    return _experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def status_after(exception: BaseException | None) -> str:
    """FINISHED after a clean fit, KILLED after Ctrl-C or a stop signal, FAILED otherwise."""
    # Lightning's SIGTERMException exists only where Lightning is loaded: not imported here, so
    # that the CLIs which only read runs (compare, serve, predict) start without its import,
    # the slowest of theirs.
    lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    stops: tuple[type[BaseException], ...] = (KeyboardInterrupt, TrainingInterrupted)
    if lightning_exceptions is not None:
        stops += (lightning_exceptions.SIGTERMException,)
    if exception is None:
        status = RunStatus.FINISHED
    elif isinstance(exception, stops):
        status = RunStatus.KILLED
    else:
        status = RunStatus.FAILED
    return RunStatus.to_string(status)

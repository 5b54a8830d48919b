"""Opening and closing the MLflow runs the harness trains in; logging a config once per run."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping

import mlflow
import yaml
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from dlharness.errors import UsageError, first_line
from dlharness.tracking.params import as_param_values
from dlharness.tracking.redaction import redact, redact_tree
from dlharness.tracking.run_binding import status_after
from dlharness.tracking.run_names import fresh_run_name
from dlharness.tracking.spool import Replayer, Spool, SpoolingClient, is_unreachable
from dlharness.tracking.store_access import server_refusal
from dlharness.training.config import TrainConfig


def set_experiment(uri: str, name: str) -> str:
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(name)
        # When another process creates the experiment between MLflow's lookup and its create,
        # set_experiment returns it without making it active, and the run would land in the
        # Default experiment (seen with four trainings started at once against a server).
        # Setting it again by id makes it active either way.
        return mlflow.set_experiment(experiment_id=experiment.experiment_id).experiment_id
    except mlflow.exceptions.MlflowException as exc:
        refusal = server_refusal(exc, uri, f"to create experiment '{name}'")
        raise UsageError(refusal or f"experiment '{name}': {first_line(exc)}") from None


@contextlib.contextmanager
def tracked_run(
    cfg: TrainConfig,
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    replayers: Mapping[str, Replayer] | None = None,
) -> Iterator[Run]:
    """Start (or, given `run_id`, reopen) an MLflow run and always end it: FINISHED, KILLED on
    Ctrl-C or a stop signal, FAILED otherwise.

    MLflow's own `start_run` context ends every exception as FAILED and leaves a process that
    exits through `sys.exit` in between; closing the run here keeps the store truthful. The
    run's spool is held open meanwhile (`replayers` replay the harness's own spooled
    operations), and the run's end is sent after everything it holds.
    """
    tags = redact({**cfg.tracking.tags, **(extra_tags or {})})
    if "description" in tags:
        # The UI shows this tag as the run's description.
        tags[MLFLOW_RUN_NOTE] = tags["description"]
    try:
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else (cfg.tracking.run_name or fresh_run_name()),
            tags=tags or None,
            log_system_metrics=cfg.tracking.system_metrics,
        )
    except MlflowException as exc:
        doing = f"to {'reopen run ' + run_id if run_id else 'create runs'} in experiment "
        refusal = server_refusal(
            exc, mlflow.get_tracking_uri(), f"{doing}'{cfg.tracking.experiment}'"
        )
        if refusal is None:
            raise
        raise UsageError(refusal) from None
    spool = Spool.open(
        cfg.tracking.spool_dir, run.info.run_id, mlflow.get_tracking_uri(), replayers
    )
    try:
        try:
            yield run
        except BaseException as exc:
            _end_run(spool, status_after(exc))
            raise
        _end_run(spool, status_after(None))
    finally:
        spool.close()


@contextlib.contextmanager
def restored_environment(*keys: str) -> Iterator[None]:
    """The variables `keys` as they were once the block ends, set or not."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _one_quick_try() -> Iterator[None]:
    """MLflow's HTTP client with no retries and a 2 s timeout, for the duration of the block."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    with restored_environment(*quick):
        os.environ.update(quick)
        yield


def _end_run(spool: Spool, name: str) -> None:
    """End the active run after everything it holds: where writes wait in the spool and the
    server answers again, they are replayed first; where it still does not answer, the end is
    spooled after them and the server is told nothing but that the run is still RUNNING."""
    end_time = int(time.time() * 1000)
    if spool.settle():
        try:
            mlflow.end_run(name)
            return
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            spool.went_offline(exc)  # MLflow has ended the run on this side already
    spool.append("set_terminated", run_id=spool.run_id, status=name, end_time=end_time)
    # Leaves this process with no active run. One quick try, as the server did not answer;
    # if it does, the run shows RUNNING until the replay sets its end after its writes.
    with _one_quick_try(), contextlib.suppress(Exception):
        mlflow.end_run(RunStatus.to_string(RunStatus.RUNNING))


def log_config(client: SpoolingClient, run_id: str, cfg: TrainConfig) -> None:
    """The resolved config, whole: flattened into params and as `config.yaml`, with the values
    of secret-looking keys and the passwords in URIs redacted.

    On a reopened run a value that differs now, such as a longer `trainer.max_epochs`, goes to
    a `dlharness.resumed_with.*` tag (params cannot change); `config.yaml` is replaced by the
    config in use.
    """
    config = redact_tree(cfg.to_dict())
    client.log_params_once(run_id, as_param_values(config))
    client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

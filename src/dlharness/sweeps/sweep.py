"""`dlharness-sweep`: an Optuna study whose trials are complete dlharness runs nested under one
parent run, judged and pruned every epoch, shared by worker processes through Optuna's storage.

A worker killed mid-trial stops beating (Optuna's heartbeat); the next trial any worker starts
fails the stale one and retries it with the same parameters and user attributes, among them
the MLflow run id: the retry resumes that run from its last logged checkpoint.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from dlharness.callbacks.trial_pruning import RUN_ATTR, EpochJudge
from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.serving.model_logging import register_candidate
from dlharness.sweeps.sweep_config import SweepConfig, load_sweep
from dlharness.tracking.interruption import TrainingInterrupted
from dlharness.tracking.provenance.run_context import set_run_tags
from dlharness.tracking.redaction import redact_uri
from dlharness.tracking.store_access import check_tracking_uri
from dlharness.training.collector import freeze_long_lived_objects
from dlharness.training.config import TrainConfig, load_config
from dlharness.training.output import plain_training_output
from dlharness.training.run_lifecycle import set_experiment

DEFAULT_STORAGE = "sqlite:///sweeps.db"
# Study user attributes: the parent run, and its store.
PARENT_ATTR = "mlflow_parent_run_id"
TAG_STUDY = "sweep.study"
TAG_TRIAL = "sweep.trial"
TAG_STATE = "sweep.state"
TAG_PRUNED_AT = "sweep.pruned_at_epoch"
TAG_RETRY_OF = "sweep.retry_of_trial"
PARENT_TAG = "mlflow.parentRunId"
# Seconds between a running trial's heartbeats, and without one before another worker takes
# the trial over (--heartbeat, --grace).
HEARTBEAT_S = 5
GRACE_S = 20
TAG_WORKER = "sweep.worker"
FINISHED_STATES = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


@dataclass
class Sweep:
    """One worker's view of the study: the sweep file, the study, where runs go."""

    config: SweepConfig
    study: optuna.Study
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    heartbeat_s: int = HEARTBEAT_S
    # The trial this worker is running, if any: an interruption queues it again.
    current_trial: int | None = None

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def build_sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    if sweep.method == "grid":
        return optuna.samplers.GridSampler(sweep.choices, seed=sweep.seed)
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def build_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=sweep.startup_trials, n_warmup_steps=sweep.warmup_epochs
        )
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, sweep.warmup_epochs))
    return optuna.pruners.NopPruner()


def build_storage(url: str, heartbeat_s: int, grace_s: int) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage with heartbeats; a stale trial is retried once, its run resumed."""
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_s,
            grace_period=grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        )
    except Exception as exc:
        raise UsageError(f"--storage {redact_uri(url)}: {str(exc).splitlines()[0]}") from None


def retried_numbers(study: optuna.Study) -> set[int]:
    return {
        number
        for trial in study.get_trials(deepcopy=False)
        for number in trial.system_attrs.get("retry_history", [])
    }


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the study's total: ended, and not since retried."""
    retried = retried_numbers(study)
    return sum(
        1
        for trial in study.get_trials(deepcopy=False, states=FINISHED_STATES)
        if trial.number not in retried
    )


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, choices in sweep.choices.items():
        values[key] = trial.suggest_categorical(key, choices)
    for key, dist in sweep.distributions.items():
        if dist.kind == "int_uniform":
            values[key] = trial.suggest_int(key, int(dist.low), int(dist.high))
        else:
            values[key] = trial.suggest_float(
                key, dist.low, dist.high, log=dist.kind == "log_uniform"
            )
    return values


def trial_config(sweep: Sweep, trial: optuna.Trial, values: dict[str, Any]) -> TrainConfig:
    overrides = {
        **sweep.config.fixed,
        **values,
        "tracker.monitor": sweep.config.metric,
        "tracker.mode": "max" if sweep.config.maximize else "min",
        "tracking.tracking_uri": sweep.tracking_uri,
        "tracking.run_name": f"{sweep.study.study_name}-trial-{trial.number}",
        # The sweep registers its best trial's model at the end (--register), not each trial's.
        "tracking.register_model": None,
    }
    cfg = load_config(sweep.config.base, overrides)
    # Beside the base config's own tags, not instead of them.
    cfg.tracking.tags.update(
        {
            PARENT_TAG: sweep.parent_run_id,
            TAG_STUDY: sweep.study.study_name,
            TAG_TRIAL: str(trial.number),
        }
    )
    return cfg


def _set_tags(sweep: Sweep, run_id: str | None, tags: dict[str, str]) -> None:
    if run_id is not None:
        set_run_tags(run_id, tags, sweep.client)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_trial(sweep: Sweep, trial: optuna.Trial) -> float:
    """The objective: one dlharness run; its best epoch's metric value."""
    from dlharness.training.train import train

    sweep.current_trial = trial.number
    values = suggest(trial, sweep.config)
    judge = EpochJudge(trial, sweep.config.metric)
    try:
        point = takeover_point(sweep, trial, judge)
        if point is not None:
            result = train(point.config, point, fast_package_index=True, callbacks=[judge])
        else:
            cfg = trial_config(sweep, trial, values)
            cfg.tracking.tags[TAG_WORKER] = worker_name()
            result = train(cfg, fast_package_index=True, callbacks=[judge])
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:
        run_id = judge.run_id or trial.user_attrs.get(RUN_ATTR)
        _set_tags(sweep, run_id, {TAG_STATE: "failed"})
        if run_id is not None and sweep.client.get_run(run_id).info.status == "RUNNING":
            sweep.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        logging.getLogger(__name__).warning(
            "trial %d failed: %s", trial.number, str(exc).splitlines()[0] if str(exc) else exc
        )
        # Optuna records a NaN objective as a failed trial, and the study goes on.
        return float("nan")
    run_id = result.run_id if result is not None else judge.run_id
    if judge.pruned_at is not None:
        _set_tags(sweep, run_id, {TAG_STATE: "pruned", TAG_PRUNED_AT: str(judge.pruned_at)})
        raise optuna.TrialPruned(f"pruned at epoch {judge.pruned_at}")
    # The worker that finished it: a taken-over run's logged config still names the dead one.
    _set_tags(sweep, run_id, {TAG_STATE: "complete", TAG_WORKER: worker_name()})
    pick = max if sweep.config.maximize else min
    return pick(judge.values.values())


def takeover_point(sweep: Sweep, trial: optuna.Trial, judge: EpochJudge):
    """Where a retried trial's run goes on: its last logged checkpoint, with the epochs it
    logged reported again; None for a fresh trial, or a run with nothing to resume (it is
    ended KILLED and the trial starts over in a new run)."""
    from dlharness.training.resume import prepare_resume

    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id is None:
        return None
    frozen = trial.study.get_trials(deepcopy=False)[trial.number]
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    tags = {TAG_RETRY_OF: str(retried), TAG_TRIAL: str(trial.number)}
    tags[TAG_WORKER] = worker_name()
    try:
        point = prepare_resume(run_id, None, {}, sweep.tracking_uri, False, trained_ok=True)
    except UsageError as exc:
        logging.getLogger(__name__).warning(
            "trial %d: run %s cannot resume (%s); starting the trial over", trial.number,
            run_id, exc,
        )  # fmt: skip
        _set_tags(sweep, run_id, {TAG_STATE: "failed", **tags})
        sweep.client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        return None
    _set_tags(sweep, run_id, tags)
    for epoch, value in _logged_values(sweep, run_id).items():
        if epoch <= point.epoch:
            trial.report(value, step=epoch)
            judge.values[epoch] = value
    return point


def _logged_values(sweep: Sweep, run_id: str) -> dict[int, float]:
    history = sweep.client.get_metric_history(run_id, sweep.config.metric)
    return {m.step: m.value for m in history}


def update_parent(sweep: Sweep) -> None:
    """The best trial so far and the trial table, in the parent run."""
    client, study, parent = sweep.client, sweep.study, sweep.parent_run_id
    trials = study.get_trials(deepcopy=False)
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    client.log_text(parent, table.to_csv(index=False), "trials.csv")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    best = study.best_trial
    client.log_metric(parent, f"best/{sweep.config.metric}", best.value, step=len(trials) - 1)
    tags = {
        "best.trial": str(best.number),
        "best.value": repr(best.value),
        "best.run_id": best.user_attrs.get(RUN_ATTR, ""),
        **{f"best.param.{key}": str(value) for key, value in best.params.items()},
    }
    set_run_tags(parent, tags, client)


def log_study_plots(sweep: Sweep) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    drawers = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
    }
    for name, draw in drawers.items():
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental; the note is not for users.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(sweep.study)
        except (ValueError, RuntimeError) as exc:  # too few finished trials for this one
            logging.getLogger(__name__).info("sweep: no %s plot: %s", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        sweep.client.log_image(sweep.parent_run_id, _png(buffer), artifact_file=f"plots/{name}.png")


def _png(buffer: io.BytesIO):
    from PIL import Image

    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def open_parent(sweep_file: SweepConfig, study_name: str, uri: str, experiment_id: str) -> str:
    """The study's parent run: created by the first worker, found and reopened by the others
    and by later starts.

    Workers on several machines may each create one at the same moment: every worker then
    keeps the earliest (by start time, then id) and deletes its own if it lost, so all of
    them agree, whatever the order of their creations and searches.
    """
    client = MlflowClient(uri)
    query = f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`sweep.role` = 'parent'"

    def parents() -> list:
        runs = client.search_runs([experiment_id], filter_string=query)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{study_name}",
        tags={TAG_STUDY: study_name, "sweep.role": "parent"},
    )
    run_id = run.info.run_id
    winner = parents()[0].info.run_id
    if winner != run_id:
        client.delete_run(run_id)
        return winner
    params = {
        "sweep.method": sweep_file.method,
        "sweep.metric": sweep_file.metric,
        "sweep.goal": sweep_file.goal,
        "sweep.trials": sweep_file.trials,
        "sweep.pruner": sweep_file.pruner,
        **{f"space.{key}": text for key, text in sweep_file.search_space().items()},
        **{f"fixed.{key}": value for key, value in sweep_file.fixed.items()},
    }
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.log_artifact(run_id, str(sweep_file.path))
    return run_id


def trials_in(study: optuna.Study, state: optuna.trial.TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def work(sweep: Sweep) -> None:
    """Run trials, one at a time, until the study holds its total, counting every worker's.

    Before each trial, trials whose worker stopped beating are failed and queued again
    (Optuna); a queued retry runs before any new trial. While the other workers' running
    trials would make up the total, this one waits for them to end or go stale.
    """
    study, total = sweep.study, sweep.config.trials
    while True:
        with warnings.catch_warnings():
            # Optuna marks it experimental since 2.9; it is what its own optimize loop calls.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        finished = finished_count(study)
        if finished >= total:
            return
        waiting = trials_in(study, optuna.trial.TrialState.WAITING)
        running = trials_in(study, optuna.trial.TrialState.RUNNING)
        if not waiting and finished + running >= total:
            time.sleep(sweep.heartbeat_s)
            continue
        study.optimize(
            lambda trial: run_trial(sweep, trial),
            n_trials=1,
            callbacks=[lambda study, trial: update_parent(sweep)],
            gc_after_trial=True,
        )


def open_sweep(args: argparse.Namespace) -> Sweep:
    config = load_sweep(args.config)
    base = load_config(config.base)
    uri = args.tracking_uri or base.resolved_tracking_uri()
    check_tracking_uri(uri)
    experiment_id = set_experiment(uri, base.tracking.experiment)
    study_name = args.study or config.path.stem
    storage = build_storage(args.storage, args.heartbeat, args.grace)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction=config.goal,
        sampler=build_sampler(config),
        pruner=build_pruner(config),
    )
    if study.direction.name.lower() != config.goal:
        raise UsageError(
            f"study {study_name} in {redact_uri(args.storage)} was made to "
            f"{study.direction.name.lower()}, the sweep file says {config.goal}"
        )
    parent = open_parent(config, study_name, uri, experiment_id)
    return Sweep(config, study, uri, experiment_id, parent, args.heartbeat)


def spawn_workers(args: argparse.Namespace, sweep: Sweep, count: int) -> list[subprocess.Popen]:
    command = [
        sys.executable, "-m", "dlharness.sweeps.sweep", "--config", args.config,
        "--study", sweep.study.study_name, "--storage", args.storage,
        "--tracking-uri", sweep.tracking_uri, "--heartbeat", str(args.heartbeat),
        "--grace", str(args.grace), "--worker",
    ]  # fmt: skip
    return [subprocess.Popen(command) for _ in range(count)]


def finish(sweep: Sweep, register: str | None) -> str:
    """Plots, the parent's end state and the best model's registration; a one-line summary."""
    update_parent(sweep)
    log_study_plots(sweep)
    done = finished_count(sweep.study) >= sweep.config.trials
    status = RunStatus.FINISHED if done else RunStatus.KILLED
    sweep.client.set_terminated(sweep.parent_run_id, RunStatus.to_string(status))
    counts = {state: 0 for state in ("COMPLETE", "PRUNED", "FAIL")}
    for trial in sweep.study.get_trials(deepcopy=False, states=FINISHED_STATES):
        counts[trial.state.name] += 1
    summary = (
        f"study {sweep.study.study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} "
        f"pruned, {counts['FAIL']} failed; parent run {sweep.parent_run_id}"
    )
    complete = [t for t in sweep.study.get_trials(deepcopy=False) if t.value is not None]
    if complete:
        best = sweep.study.best_trial
        run_id = best.user_attrs.get(RUN_ATTR)
        summary += (
            f"; best trial {best.number}: {sweep.config.metric} {best.value:.4f} (run {run_id})"
        )
        if register is not None and run_id is not None:
            import mlflow

            mlflow.set_tracking_uri(sweep.tracking_uri)
            version = register_candidate(f"runs:/{run_id}/classifier", register)
            summary += f"; registered {register} version {version}, alias candidate"
    return summary


def requeue_interrupted(sweep: Sweep) -> None:
    """The trial Ctrl-C stopped (Optuna failed it) queued again, as a stale one is: the next
    start resumes its run, stored at the interruption, and it does not count towards the total."""
    if sweep.current_trial is None:
        return
    frozen = sweep.study.get_trials(deepcopy=False)[sweep.current_trial]
    if frozen.state == optuna.trial.TrialState.FAIL:
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(sweep.study, frozen)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-sweep",
        description="Search hyperparameters with Optuna: every trial a dlharness run nested "
        "under one parent run, judged and pruned every epoch.",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="the sweep file (YAML)")
    parser.add_argument(
        "--study", default=None, help="Optuna study name (default: the sweep file's name)"
    )
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="Optuna storage shared by the workers: sqlite:///FILE or postgresql://… "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="trial processes on this machine (default: 1)"
    )
    parser.add_argument(
        "--register", metavar="NAME", default=None,
        help="register the best trial's classifier under NAME, alias candidate (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: the base config's, else $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--heartbeat", type=int, default=HEARTBEAT_S, metavar="S",
        help="seconds between a running trial's heartbeats (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--grace", type=int, default=GRACE_S, metavar="S",
        help="seconds without a heartbeat before another worker takes the trial over and "
        "resumes its run (default: %(default)s)",
    )  # fmt: skip
    # A process started by --workers: it runs trials and leaves the summary to its starter.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_training_output()
    try:
        if args.workers < 1:
            raise UsageError(f"--workers must be ≥ 1, got {args.workers}")
        if not 0 < args.heartbeat < args.grace:
            raise UsageError("--heartbeat must be above 0 and below --grace")
        sweep = open_sweep(args)
    except UsageError as exc:
        print(f"dlharness-sweep: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    freeze_long_lived_objects()
    workers = [] if args.worker else spawn_workers(args, sweep, args.workers - 1)
    try:
        work(sweep)
    except (TrainingInterrupted, KeyboardInterrupt):
        requeue_interrupted(sweep)
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait()
        if not args.worker:
            sweep.client.set_terminated(sweep.parent_run_id, RunStatus.to_string(RunStatus.KILLED))
        print("dlharness-sweep: interrupted; run the same command to go on", file=sys.stderr)
        return 128 + signal.SIGINT
    for worker in workers:
        worker.wait()
    if args.worker:
        return 0
    print(finish(sweep, args.register))
    return 0


if __name__ == "__main__":
    sys.exit(main())

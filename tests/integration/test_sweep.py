"""dlharness-sweep: Optuna trials as nested MLflow runs, pruned per epoch, shared by workers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dlharness.models.classifier import ClassifierModule
from dlharness.store import compare
from dlharness.sweeps import sweep
from dlharness.tracking.checkpointing.artifacts import stored_epochs

from ..conftest import PYTHON, cli_env, empty_store

BASE_YAML = """
data: {batch_size: 128}
model: {width: 8}
trainer: {max_epochs: 2, accelerator: cpu}
tracking: {experiment: sweeps, system_metrics: false}
tracker: {onnx: false}
"""


def write_sweep(folder: Path, name: str = "sweep.yaml", **fields) -> Path:
    base = folder / "base.yaml"
    base.write_text(BASE_YAML)
    document = {"base": str(base), "metric": {"name": "val/acc", "goal": "maximize"}, **fields}
    path = folder / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def trial_runs(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_experiment_by_name("sweeps")
    query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    return client.search_runs([experiment.experiment_id], filter_string=query)


def the_parent(client: MlflowClient):
    experiment = client.get_experiment_by_name("sweeps")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`sweep.role` = 'parent'"
    )
    return parent


GOOD = {"optim.lr": {"values": [0.003]}}
BAD_FILES = [
    ({"trials": 2, "parameters": GOOD, "colour": "blue"}, "unknown key 'colour'; valid: base, metric"),
    ({"trials": 2, "parameters": {"optim.learning_rate": {"values": [0.1]}}}, "parameters.optim.learning_rate is not a key of the training config"),
    ({"trials": 2, "parameters": {"optim.lr": {"distribution": "normal", "min": 0.1, "max": 1}}}, "distribution 'normal' unknown; valid: uniform, log_uniform, int_uniform"),
    ({"trials": 2, "parameters": {"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 0.001}}}, "parameters.optim.lr: min 0.1 must be below max 0.001"),
    ({"trials": 2, "parameters": {"optim.lr": {"distribution": "log_uniform", "min": 0, "max": 0.1}}}, "log_uniform needs min > 0"),
    ({"trials": 2, "parameters": {"model.width": {"values": []}}}, "parameters.model.width: values is empty"),
    ({"trials": 2, "parameters": {"optim.optimizer": {"values": ["adam", "adamx"]}}}, "parameters.optim.optimizer: optim.optimizer 'adamx' is not one of: adam, adamw, sgd"),
    ({"trials": 2, "parameters": GOOD, "metric": {"name": "val/accuracy"}}, "metric.name 'val/accuracy' is not logged every epoch; valid: val/loss"),
    ({"trials": 5, "method": "grid", "parameters": {"model.width": {"values": [8, 16]}, "optim.lr": {"values": [0.1, 0.01]}}}, "trials 5 exceeds the grid's 4 combinations"),
    ({"trials": 2, "method": "grid", "parameters": {"optim.lr": {"distribution": "uniform", "min": 0.001, "max": 0.1}}}, "method grid needs values: [...]; parameters.optim.lr is a range"),
    ({"trials": 2, "method": "bayes", "parameters": GOOD}, "method 'bayes' unknown; valid: tpe, random, grid"),
    ({"trials": 2, "parameters": GOOD, "pruner": {"type": "asha"}}, "pruner.type 'asha' unknown; valid: median, hyperband, none"),
    ({"trials": 0, "parameters": GOOD}, "trials must be a whole number ≥ 1, got 0"),
    ({"trials": 2, "parameters": {"trainer.max_epochs": 3}}, "parameters search nothing"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), BAD_FILES)
def test_bad_sweep_files_are_one_line_exit_2_before_any_run(tmp_path, capsys, fields, expected):
    path = write_sweep(tmp_path, **fields)
    storage = tmp_path / "study.db"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--config", str(path), "--storage", f"sqlite:///{storage}", "--tracking-uri", uri]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlharness-sweep: error: sweep file {path}: ")
    assert expected in err
    assert err.count("\n") == 1
    assert not storage.exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_grid_sweep_runs_its_grid_prunes_the_hopeless_and_registers_the_best(tmp_path, capsys):
    uri = empty_store(tmp_path)
    path = write_sweep(
        tmp_path,
        method="grid",
        trials=4,
        seed=4,
        # Adam at a learning rate of 40 learns nothing: a hopeless half of the grid.
        parameters={"optim.lr": {"values": [0.01, 40.0]}, "model.width": {"values": [8, 12]}},
        pruner={"type": "median", "warmup_epochs": 0, "startup_trials": 1},
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = ["--config", str(path), "--storage", storage, "--tracking-uri", uri]
    assert sweep.main([*argv, "--register", "digits-sweep"]) == 0
    client = MlflowClient(uri)
    parent = the_parent(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.optim.lr"] == "one of [0.01, 40.0]"
    runs = trial_runs(client, parent.info.run_id)
    combos = {(r.data.params["optim.lr"], r.data.params["model.width"]) for r in runs}
    assert combos == {("0.01", "8"), ("0.01", "12"), ("40.0", "8"), ("40.0", "12")}
    by_trial = {int(r.data.tags["sweep.trial"]): r for r in runs}
    assert sorted(by_trial) == [0, 1, 2, 3]
    assert by_trial[0].data.params["optim.lr"] == "0.01"  # the seed puts a good trial first
    for number, run in by_trial.items():
        assert run.info.status == "FINISHED"
        val_acc_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        if run.data.params["optim.lr"] == "40.0":
            # Judged worse than the median at epoch 0: stopped there, what it logged kept.
            assert run.data.tags["sweep.state"] == "pruned", number
            assert run.data.tags["sweep.pruned_at_epoch"] == "0"
            assert val_acc_steps == [0]
        else:
            assert run.data.tags["sweep.state"] == "complete", number
            assert val_acc_steps == [0, 1]
    good = [r for r in runs if r.data.tags["sweep.state"] == "complete"]
    best = max(good, key=lambda r: r.data.metrics["val/acc"])
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/acc"] == best.data.metrics["val/acc"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "trials.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 1 + 4
    version = client.get_model_version_by_alias("digits-sweep", "candidate")
    assert version.run_id == best.info.run_id
    assert f"best trial {best.data.tags['sweep.trial']}" in capsys.readouterr().out

    # dlharness-compare --sweep: a row per trial, best first.
    capsys.readouterr()
    assert compare.main(["--sweep", parent.info.run_id, "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    order = [table.index(f"({r.info.run_id[:8]})") for r in sorted(
        good, key=lambda r: -r.data.metrics["val/acc"]
    )]  # fmt: skip
    assert order == sorted(order)
    assert "complete" in table and "pruned" in table

    # The study is complete: running the command again adds no trial.
    assert sweep.main(argv) == 0
    assert len(trial_runs(client, parent.info.run_id)) == 4
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert len(study.trials) == 4


@pytest.mark.slow
def test_two_workers_share_one_study_and_take_over_a_killed_workers_trial(tmp_path):
    """Six trials of three epochs by two processes; one is SIGKILLed after its trial's first
    checkpoint, and the other resumes that trial's run from it."""
    uri = empty_store(tmp_path)
    path = write_sweep(
        tmp_path,
        method="random",
        trials=6,
        parameters={
            "optim.lr": {"distribution": "log_uniform", "min": 0.001, "max": 0.01},
            "trainer.max_epochs": 3,
        },
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [
        PYTHON, "-m", "dlharness.sweeps.sweep", "--config", str(path), "--storage", storage,
        "--tracking-uri", uri, "--workers", "2", "--heartbeat", "1", "--grace", "3",
    ]  # fmt: skip
    main = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    client = MlflowClient(uri)
    killed_run, killed_pid = None, None
    try:
        deadline = time.monotonic() + 180
        while killed_run is None and time.monotonic() < deadline and main.poll() is None:
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("sweeps")
            if experiment is None:
                continue
            for run in client.search_runs(
                [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
            ):
                worker = run.data.tags.get("sweep.worker", "")
                pid = int(worker.rsplit(":", 1)[1]) if worker else main.pid
                if pid != main.pid and stored_epochs(client, run.info.run_id):
                    os.kill(pid, signal.SIGKILL)
                    killed_run, killed_pid = run.info.run_id, pid
                    break
        assert killed_run is not None, "no trial of the second worker reached a checkpoint"
        out, _ = main.communicate(timeout=300)
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)
    assert main.returncode == 0, out[-3000:]

    parent = the_parent(client)
    assert parent.info.status == "FINISHED"
    runs = trial_runs(client, parent.info.run_id)
    assert len(runs) == 6  # the retried trial went on in its own run
    assert [r.info.status for r in runs] == ["FINISHED"] * 6
    assert all(r.data.tags["sweep.state"] == "complete" for r in runs)
    taken = client.get_run(killed_run)
    assert "sweep" not in taken.data.tags  # dotted tag keys survive the resume whole
    assert taken.data.tags["sweep.retry_of_trial"].isdigit()
    assert taken.data.tags["sweep.worker"].endswith(f":{main.pid}")  # finished by the other
    assert int(taken.data.tags["dlharness.resumed_from_epoch"]) >= 0
    assert [m.step for m in client.get_metric_history(killed_run, "val/acc")] == [0, 1, 2]
    study = optuna.load_study(study_name="sweep", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 6
    assert states.count("FAIL") == 1  # the killed worker's trial, failed and retried
    assert str(killed_pid) not in taken.data.tags["sweep.worker"]


@pytest.mark.slow
def test_two_workers_share_a_study_in_postgresql(tmp_path):
    """The storage several machines share, with two worker processes (small: the crash
    takeover is the SQLite test's)."""
    from .test_server import fresh_postgres_database

    storage = fresh_postgres_database()
    uri = empty_store(tmp_path)
    path = write_sweep(
        tmp_path,
        method="random",
        trials=3,
        parameters={
            "optim.lr": {"distribution": "log_uniform", "min": 0.001, "max": 0.01},
            "trainer.max_epochs": 1,
        },
    )
    command = [
        PYTHON, "-m", "dlharness.sweeps.sweep", "--config", str(path), "--storage", storage,
        "--tracking-uri", uri, "--workers", "2",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    parent = the_parent(client)
    runs = trial_runs(client, parent.info.run_id)
    assert sorted(int(r.data.tags["sweep.trial"]) for r in runs) == [0, 1, 2]
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in runs}
    assert f"parent run {parent.info.run_id}" in done.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_same_command_resumes_the_stopped_trial(
    tmp_path, monkeypatch, capsys
):
    uri = empty_store(tmp_path)
    path = write_sweep(
        tmp_path,
        method="random",
        trials=1,
        parameters={
            "optim.lr": {"distribution": "log_uniform", "min": 0.001, "max": 0.01},
            "trainer.max_epochs": 3,
        },
    )
    argv = ["--config", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}"]
    argv += ["--tracking-uri", uri]
    original = ClassifierModule.training_step

    def ctrl_c_in_epoch_1(module, batch, index):
        if (module.trainer.current_epoch, index) == (1, 3):
            os.kill(os.getpid(), signal.SIGINT)
        return original(module, batch, index)

    monkeypatch.setattr(ClassifierModule, "training_step", ctrl_c_in_epoch_1)
    assert sweep.main(argv) == 130
    monkeypatch.undo()
    assert "run the same command to go on" in capsys.readouterr().err
    client = MlflowClient(uri)
    parent = the_parent(client)
    assert parent.info.status == "KILLED"
    (stopped,) = trial_runs(client, parent.info.run_id)
    assert stopped.info.status == "KILLED"

    assert sweep.main(argv) == 0
    assert the_parent(client).info.status == "FINISHED"
    # The stopped trial went on in its own run: still one trial run.
    assert [r.info.run_id for r in trial_runs(client, parent.info.run_id)] == [stopped.info.run_id]
    resumed = client.get_run(stopped.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["sweep.retry_of_trial"] == "0"
    assert resumed.data.tags["dlharness.resumed_from_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "val/acc")] == [0, 1, 2]

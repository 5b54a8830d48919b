"""Four trainings started at the same moment against one fresh store: four complete runs."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.tracking.checkpointing.artifacts import stored_epochs
from dlharness.training.cli import main

from ..conftest import assert_nothing_running

TRAININGS = 4
EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1")
CONCURRENT_YAML = """
data: {batch_size: 128}
model: {width: 8}
trainer: {max_epochs: 2, accelerator: cpu}
tracking: {system_metrics: false, experiment: concurrent}
tracker: {onnx: false}
"""


def _train_at_the_barrier(barrier, argv: list[str], log_path: str) -> None:
    """One training process: wait for the others, then run the real CLI."""
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        del os.environ[name]
    # One torch thread each, as torchrun gives every process: four processes of two spinning
    # OpenMP threads on two cores spend their time waiting on each other.
    torch.set_num_threads(1)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        barrier.wait()
        code = main(argv)
    sys.exit(code)


def train_concurrently(uri: str, folder: Path) -> None:
    """TRAININGS processes run the CLI against `uri` from the same moment; check what each
    left in the store.

    The processes are forked from a server that has imported dlharness once (10 s a process
    otherwise), and a barrier lines up their first touch of the store.
    """
    (folder / "concurrent.yaml").write_text(CONCURRENT_YAML)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dlharness.training.cli", "dlharness.training.train"])
    barrier = context.Barrier(TRAININGS)
    argv = ["--config", str(folder / "concurrent.yaml"), "--tracking-uri", uri, "--run-name"]
    logs = [folder / f"training-{i}.log" for i in range(TRAININGS)]
    processes = [
        context.Process(
            target=_train_at_the_barrier, args=(barrier, [*argv, f"concurrent-{i}"], str(log))
        )
        for i, log in enumerate(logs)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)
    for process, log in zip(processes, logs, strict=True):
        output = log.read_text()
        assert process.exitcode == 0, output[-3000:]
        assert "database is locked" not in output
        assert "Traceback" not in output

    client = MlflowClient(uri)
    [experiment] = client.search_experiments(filter_string="name = 'concurrent'")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"concurrent-{i}" for i in range(TRAININGS)]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in EPOCH_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == [0, 1], (run.info.run_name, key)
        assert stored_epochs(client, run.info.run_id) == [0, 1]
        assert "test/acc" in run.data.metrics
    assert_nothing_running(uri)


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
def test_four_trainings_at_once_on_one_fresh_sqlite_file(tmp_path):
    db_path = tmp_path / "fresh.db"
    train_concurrently(f"sqlite:///{db_path}", tmp_path)
    assert integrity(db_path) == "ok"

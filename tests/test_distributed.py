"""DDP on CPU (gloo) through the real CLI: two processes, one MLflow run, rank 0 logging."""

from __future__ import annotations

import csv
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dlharness.app.compare import main as compare_main
from dlharness.app.distributed import is_launch_leader
from dlharness.tracking.checkpoints import stored_epochs

from .conftest import PYTHON, REPO, assert_nothing_running, cli_env, empty_store

EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1", "val/auroc")
# 270 validation samples split evenly between 2 ranks: no sample is padded in twice, so the
# metrics the ranks agree on are those of the whole validation split.
DDP_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 2, accelerator: cpu, devices: 2, strategy: ddp}
tracking: {system_metrics: false, experiment: ddp}
tracker: {onnx: false}
"""


def run_cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(REPO / "scripts" / "train.py"), *argv],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("dlharness-checkpoints-*"))


@pytest.mark.slow
def test_ddp_trains_one_run_with_reduced_metrics_and_resumes(tmp_path):
    uri = empty_store(tmp_path)
    (tmp_path / "ddp.yaml").write_text(DDP_YAML)
    scratch_before = scratch_folders()

    first = run_cli(tmp_path, "--config", "ddp.yaml", "--tracking-uri", uri)
    assert first.returncode == 0, first.stderr[-3000:]
    # One report, from rank 0; the other rank trained and stayed silent.
    assert first.stdout.count(" finished: ") == 1
    assert "Starting with 2 processes" in first.stdout + first.stderr

    client = MlflowClient(uri)
    [experiment] = client.search_experiments(filter_string="name = 'ddp'")
    [run] = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["env.devices"] == "2"
    assert run.data.params["trainer.strategy"] == "ddp"
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
    # Written by rank 0 alone: one checkpoint per epoch, one model.
    assert stored_epochs(client, run_id) == [0, 1]
    models = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert len(models) == 1

    # The reduced validation metrics equal one process's evaluation of the same checkpoints
    # on the whole validation split.
    table = tmp_path / "eval.csv"
    argv = ["--run", run_id, "--epochs", "0,1", "--evaluate", "--split", "val"]
    argv += ["--csv", str(table), "--plot", str(tmp_path / "cm.png"), "--tracking-uri", uri]
    assert compare_main(argv) == 0
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    for row in rows:
        for key in ("val/loss", "val/acc", "val/f1", "val/auroc"):
            logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            assert float(row[key]) == pytest.approx(logged[int(row["epoch"])], abs=1e-5), key

    resumed = run_cli(tmp_path, "--resume", run_id, "--max-epochs", "3", "--tracking-uri", uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run {run_id} finished" in resumed.stdout
    assert len(client.search_runs([experiment.experiment_id])) == 1
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2], key
    assert stored_epochs(client, run_id) == [0, 1, 2]
    assert client.get_run(run_id).data.tags["dlharness.resumed_from_epoch"] == "1"
    assert_nothing_running(uri)
    assert scratch_folders() == scratch_before


@pytest.mark.parametrize(
    ("env", "leads"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun, rank 0
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun, another rank
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's launcher started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first process of the second node
        ({"NODE_RANK": "1"}, False),  # the launching process on the second node
        ({"SLURM_PROCID": "2"}, False),  # srun task 2
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # one SLURM task, Lightning's child
        ({"SLURM_PROCID": "0"}, True),
    ],
)
def test_only_global_rank_zero_leads(monkeypatch, env, leads):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_launch_leader() is leads

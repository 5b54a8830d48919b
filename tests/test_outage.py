"""A tracking server killed mid-run: training finishes, what the server missed is spooled,
and `dlharness-sync` after a restart gives the run exactly what an uninterrupted run has."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.cli import main as train_main
from dlharness.config import load_config
from dlharness.server import free_port, server_command, server_env, stop_server, wait_until_healthy
from dlharness.sync import main as sync_main
from dlharness.tracking.checkpoints import BEST_EPOCH_TAG, LATEST_CHECKPOINT_TAG, stored_epochs
from dlharness.train import train

from .conftest import artifact_paths, empty_store, epoch_histories

EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1", "val/auroc")
OUTAGE_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 6, accelerator: cpu}
tracking: {system_metrics: false, experiment: outage, run_name: outage}
tracker: {keep_last_checkpoints: 3, onnx: false}
"""


def start_server(folder: Path, port: int) -> subprocess.Popen:
    command = server_command(f"sqlite:///{folder / 'server.db'}", str(folder / "artifacts"),
                             port=port)  # fmt: skip
    log = open(folder / "server.log", "ab")  # noqa: SIM115 (closed when the process ends)
    process = subprocess.Popen(
        command, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_until_healthy(f"http://127.0.0.1:{port}", process, 90)
    return process


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, str, Path]:
    """(store URI, run id, config file) of the same training with no outage."""
    folder = tmp_path_factory.mktemp("outage-reference")
    config = folder / "outage.yaml"
    config.write_text(OUTAGE_YAML)
    uri = empty_store(folder)
    return uri, train(load_config(config, {"tracking.tracking_uri": uri})).run_id, config


@pytest.mark.slow
def test_server_killed_mid_run_then_sync_gives_the_uninterrupted_run(
    reference, tmp_path, capsys, monkeypatch
):
    ref_uri, ref_run, config = reference
    monkeypatch.chdir(tmp_path)  # the spool goes to ./mlflow-spool
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    pattern = "artifacts/*/*/artifacts/checkpoints/epoch_2/checkpoint_metrics.json"

    def kill_server_after_epoch_2() -> None:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(pattern)) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_server_after_epoch_2)
    killer.start()
    capsys.readouterr()
    code = train_main(["--config", str(config), "--tracking-uri", url])
    killer.join()
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "Traceback" not in captured.err
    run_id = re.search(r"^run ([0-9a-f]{32}) finished", captured.out, re.MULTILINE).group(1)
    spool = Path("mlflow-spool").resolve() / run_id
    assert f"dlharness-sync {spool}" in captured.err
    assert (spool / "journal.jsonl").is_file()

    server.wait()
    server = start_server(tmp_path, port)  # the same backend and artifact folder
    try:
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "RUNNING"  # its end is in the spool too
        capsys.readouterr()
        assert sync_main([str(spool)]) == 0
        assert f"replayed into run {run_id}" in capsys.readouterr().out

        ours, theirs = client.get_run(run_id), MlflowClient(ref_uri).get_run(ref_run)
        assert ours.info.status == "FINISHED"
        assert epoch_histories(client, run_id, EPOCH_KEYS) == epoch_histories(
            MlflowClient(ref_uri), ref_run, EPOCH_KEYS
        )
        mine = {k: v for k, v in ours.data.params.items() if k != "tracking.tracking_uri"}
        refs = {k: v for k, v in theirs.data.params.items() if k != "tracking.tracking_uri"}
        assert mine == refs
        assert artifact_paths(client, run_id) == artifact_paths(MlflowClient(ref_uri), ref_run)
        assert stored_epochs(client, run_id) == stored_epochs(MlflowClient(ref_uri), ref_run)
        for key in (BEST_EPOCH_TAG, LATEST_CHECKPOINT_TAG):
            assert ours.data.tags.get(key) == theirs.data.tags.get(key), key
        mlflow.set_tracking_uri(url)
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        mlflow.set_tracking_uri(ref_uri)
        expected = mlflow.pytorch.load_model(f"runs:/{ref_run}/model")
        batch = torch.randn(3, 1, 8, 8)
        assert torch.equal(model(batch), expected(batch))

        assert sync_main([str(spool)]) == 0
        assert "already replayed" in capsys.readouterr().out
    finally:
        stop_server(server)

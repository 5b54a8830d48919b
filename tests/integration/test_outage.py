"""A tracking server killed mid-run: training finishes, what the server missed is spooled,
and `dlharness-sync` after a restart gives the run exactly what an uninterrupted run has."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness import MlflowTracking
from dlharness.store.server import (
    free_port,
    server_command,
    server_env,
    stop_server,
    wait_until_healthy,
)
from dlharness.store.sync import main as sync_main
from dlharness.tracking.checkpointing.artifacts import (
    BEST_EPOCH_TAG,
    LATEST_CHECKPOINT_TAG,
    stored_epochs,
)
from dlharness.tracking.checkpointing.logged_models import checkpoint_models
from dlharness.tracking.spool import HTTP_DEFAULTS, Spool, SpoolWarning
from dlharness.training.cli import main as train_main
from dlharness.training.config import load_config
from dlharness.training.train import train

from ..conftest import (
    AfterStoredCheckpoint,
    artifact_paths,
    cli_trains_with,
    empty_store,
    epoch_histories,
)

EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1", "val/auroc")
OUTAGE_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 6, accelerator: cpu}
tracking: {system_metrics: false, experiment: outage, run_name: outage}
tracker: {keep_last_checkpoints: 3, onnx: false}
"""


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """A server on `folder/server.db` (a fresh store the first time, the same one after)."""
    backend = f"sqlite:///{folder / 'server.db'}"
    if not (folder / "server.db").exists():
        backend = empty_store(folder, "server.db")
    command = server_command(backend, str(folder / "artifacts"), port=port)
    log = open(folder / "server.log", "ab")  # noqa: SIM115 (closed when the process ends)
    process = subprocess.Popen(
        command, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_until_healthy(f"http://127.0.0.1:{port}", process, 90)
    return process


def assert_same_as_reference(client: MlflowClient, run_id: str, ref_uri: str, ref_run: str) -> None:
    """The run holds what the run without an outage holds: its end, every epoch value, param,
    artifact, checkpoint, checkpoint tag and model (the served classifier answers the same)."""
    url = client.tracking_uri
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
    # The same checkpoint models, made late if the server was silent when they were stored.
    assert checkpoint_model_summary(client, ours) == checkpoint_model_summary(
        MlflowClient(ref_uri), theirs
    )
    mlflow.set_tracking_uri(url)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    mlflow.set_tracking_uri(ref_uri)
    expected = mlflow.pytorch.load_model(f"runs:/{ref_run}/model")
    batch = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(batch), expected(batch))
    # The served classifier was replayed too, and answers raw pixels the same.
    pixels = [np.arange(64, dtype=np.uint8).reshape(8, 8)]
    mlflow.set_tracking_uri(url)
    [served] = mlflow.pyfunc.load_model(f"runs:/{run_id}/classifier").predict(pixels)
    mlflow.set_tracking_uri(ref_uri)
    [ref] = mlflow.pyfunc.load_model(f"runs:/{ref_run}/classifier").predict(pixels)
    assert served.class_name == ref.class_name
    np.testing.assert_allclose(
        list(served.probabilities.values()), list(ref.probabilities.values()), atol=1e-6
    )


def checkpoint_model_summary(client: MlflowClient, run) -> dict[int, tuple]:
    """Per checkpoint model: its status, roles and linked metrics (value and dataset)."""
    models = checkpoint_models(client, run.info.experiment_id, run.info.run_id)
    return {
        epoch: (
            model.status,
            sorted(k for k in model.tags if k in ("dlharness.latest", "dlharness.best")),
            sorted((m.key, m.value, m.step, m.dataset_name) for m in model.metrics),
        )
        for epoch, model in models.items()
    }


def cli_through_outage(
    monkeypatch, capsys, config: Path, url: str, fault: L.Callback
) -> tuple[str, Path, str]:
    """The CLI's training against `url` with `fault` among its callbacks: (run id, the run's
    spool folder, standard error), once it exited 0 without a traceback."""
    cli_trains_with(monkeypatch, fault)
    capsys.readouterr()
    code = train_main(["--config", str(config), "--tracking-uri", url])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "Traceback" not in captured.err
    run_id = re.search(r"^run ([0-9a-f]{32}) finished", captured.out, re.MULTILINE).group(1)
    return run_id, Path("mlflow-spool").resolve() / run_id, captured.err


class FrozenServer(AfterStoredCheckpoint):
    """Stops the server's processes (SIGSTOP: the port stays open and nothing answers, as with
    an overloaded server or a partition without resets) at the start of epoch `epoch`, once the
    previous checkpoint is stored, and continues them `thaw_after_s` later (never, if None).
    From then on each training batch takes `batch_s` longer, so that training outlasts the
    freeze however fast the machine is."""

    def __init__(
        self, server: subprocess.Popen, artifacts: Path, epoch: int, thaw_after_s: float | None,
        batch_s: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(artifacts, epoch, self.freeze)
        self.server, self.thaw_after_s, self.batch_s = server, thaw_after_s, batch_s
        self.frozen_at: float | None = None
        self._thaw: threading.Timer | None = None

    def freeze(self) -> None:
        os.killpg(self.server.pid, signal.SIGSTOP)
        self.frozen_at = time.monotonic()
        if self.thaw_after_s is not None:
            self._thaw = threading.Timer(self.thaw_after_s, self.thaw)
            self._thaw.start()

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGCONT)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.frozen_at is not None:
            time.sleep(self.batch_s)

    def stop(self) -> None:
        """Continue the server now (the test's end, however it ends)."""
        if self._thaw is not None:
            self._thaw.cancel()
        self.thaw()


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[tuple[subprocess.Popen, str]]:
    """(process, URL) of a real server on a fresh store in `tmp_path`, which is the working
    directory (the spool goes to ./mlflow-spool); stopped at the end, frozen or not."""
    monkeypatch.chdir(tmp_path)
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGCONT)
        stop_server(server)


@pytest.mark.slow
def test_a_server_that_hangs_stalls_training_once_and_gets_everything_back_by_itself(
    reference, served, tmp_path, monkeypatch, recwarn
):
    ref_uri, ref_run, config = reference
    server, url = served
    # Frozen for longer than a request waits (5 s, tried twice), thawed while training goes on:
    # four epochs of 20 batches × 0.2 s are left after it stops.
    frozen = FrozenServer(server, tmp_path / "artifacts", 2, thaw_after_s=14, batch_s=0.2)
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    try:
        result = train(load_config(config, {"tracking.tracking_uri": url}), callbacks=[frozen])
        # MLflow's HTTP settings were dlharness's while it trained, and are the caller's again.
        assert not set(HTTP_DEFAULTS) & set(os.environ)
        thawed_at = frozen.frozen_at + 14
        assert time.monotonic() > thawed_at + 2, "training ended before the server answered"
        # One request's wait (5 s, once more at once, up to 1 s of jitter) for the whole
        # outage, not one per write; a margin of 4 s for a slow machine.
        assert result.timings["tracking_hooks"] < 15, result.timings
        assert any(issubclass(w.category, SpoolWarning) for w in recwarn)
        # Replayed during training, without dlharness-sync: nothing waits, nothing is lost.
        assert result.spooled is None and result.spooled_writes == 0
        spool = tmp_path / "mlflow-spool" / result.run_id
        assert not (spool / "journal.jsonl").exists() and (spool / "journal.synced.jsonl").exists()
        assert_same_as_reference(MlflowClient(url), result.run_id, ref_uri, ref_run)
    finally:
        frozen.stop()


@pytest.mark.slow
def test_a_server_frozen_past_the_end_leaves_a_running_run_and_the_command_that_completes_it(
    reference, served, tmp_path, capsys, monkeypatch
):
    ref_uri, ref_run, config = reference
    server, url = served
    frozen = FrozenServer(server, tmp_path / "artifacts", 2, thaw_after_s=None)
    try:
        run_id, spool, err = cli_through_outage(monkeypatch, capsys, config, url, frozen)
        last = err.strip().splitlines()[-1]
        count = int(re.search(rf"(\d+) writes of run {run_id} wait in {spool}", last).group(1))
        assert last.endswith(f"run: dlharness-sync {spool}")
        assert count == Spool.load(spool).waiting() > 0

        frozen.stop()
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "RUNNING"  # its end waits in the spool
        assert sync_main([str(spool)]) == 0
        assert_same_as_reference(client, run_id, ref_uri, ref_run)
    finally:
        frozen.stop()


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

    def kill_server() -> None:
        os.killpg(server.pid, signal.SIGKILL)

    # Killed once epoch 2's checkpoint is stored, before epoch 3 trains.
    outage = AfterStoredCheckpoint(tmp_path / "artifacts", 3, kill_server)
    run_id, spool, err = cli_through_outage(monkeypatch, capsys, config, url, outage)
    assert f"dlharness-sync {spool}" in err
    assert (spool / "journal.jsonl").is_file()

    server.wait()
    server = start_server(tmp_path, port)  # the same backend and artifact folder
    try:
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "RUNNING"  # its end is in the spool too
        capsys.readouterr()
        assert sync_main([str(spool)]) == 0
        assert f"replayed into run {run_id}" in capsys.readouterr().out

        assert_same_as_reference(client, run_id, ref_uri, ref_run)

        assert sync_main([str(spool)]) == 0
        assert "already replayed" in capsys.readouterr().out
    finally:
        stop_server(server)


@pytest.mark.slow
def test_callback_in_an_own_module_spools_through_a_killed_server_and_sync_completes_it(
    tmp_path, monkeypatch, capsys, caplog
):
    from .test_mlflow_tracking import EXTERNAL_KEYS, ExternalData, ExternalModule

    monkeypatch.chdir(tmp_path)  # the spool goes to ./mlflow-spool
    # A dead server is noticed at the first write (MLflow's defaults retry for minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)

    def kill_server() -> None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    try:
        tracking = MlflowTracking(tracking_uri=url, experiment_name="own", system_metrics=False)
        trainer = L.Trainer(
            max_epochs=4,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            callbacks=[AfterStoredCheckpoint(tmp_path / "artifacts", 2, kill_server), tracking],
        )
        with pytest.warns(SpoolWarning):
            trainer.fit(ExternalModule(), datamodule=ExternalData())
        run_id = tracking.run.run_id
        spool = tmp_path / "mlflow-spool" / run_id
        assert (spool / "journal.jsonl").is_file()
        # The fit's last word says what waits and the command that sends it.
        [said] = [
            r.getMessage() for r in caplog.records if "did not answer before" in r.getMessage()
        ]
        assert f"{Spool.load(spool).waiting()} writes of run {run_id}" in said
        assert said.endswith(f"run: dlharness-sync {spool}")

        server = start_server(tmp_path, port)  # the same backend and artifact folder
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "RUNNING"  # its end is in the spool too
        assert sync_main([str(spool)]) == 0
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in EXTERNAL_KEYS:
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2, 3]
        assert stored_epochs(client, run_id) == [0, 1, 2, 3]
        assert run.data.tags[LATEST_CHECKPOINT_TAG] == "checkpoints/epoch_3/checkpoint.pth"
        assert "plots/loss_curves.png" in artifact_paths(client, run_id)
    finally:
        stop_server(server)

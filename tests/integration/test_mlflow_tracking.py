"""`MlflowTracking` in projects that are not dlharness: Lightning's BoringModel, a module written
like a typical external project, an active MLflow run, an MLFlowLogger, resume, misuse."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import mlflow
import psutil
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dlharness
from dlharness import CheckpointError, MlflowTracking, checkpoint_path
from dlharness.callbacks.mlflow_tracking import PICTURE_HELPER
from dlharness.tracking.checkpointing.artifacts import BEST_EPOCH_TAG, stored_epochs
from dlharness.tracking.checkpointing.logged_models import checkpoint_models

from ..conftest import artifact_paths, empty_store

EXTERNAL_KEYS = ("train_loss_epoch", "val_loss", "val_acc")


class ExternalModule(L.LightningModule):
    """Written as a typical project writes one: flat metric names, nothing returned from
    validation_step, hyperparameters saved."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ExternalData(L.LightningDataModule):
    """Three separable classes of 8 features; the training loader shuffles with torch's global
    generator (Lightning's default DataLoader)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(240) % 3
        x = torch.randn(240, 8, generator=generator) + F.one_hot(y, 8).float() * 2
        self.train_set = TensorDataset(x[:192], y[:192])
        self.val_set = TensorDataset(x[192:], y[192:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=48)


def trainer_for(
    tracking: MlflowTracking, max_epochs: int = 2, others: tuple = (), **kwargs
) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=[*others, tracking],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def dlharness_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dlharness")]


def child_pids() -> set[int]:
    # Other tests in the same worker process may have left long-lived children of their own
    # (multiprocessing's resource tracker): what counts is that fit adds none.
    return {child.pid for child in psutil.Process().children()}


def scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("dlharness-*"))


def own_environment() -> dict[str, str]:
    """The process's environment but MLflow's telemetry session, which MLflow manages itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_TELEMETRY")}


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store; the experiments MlflowTracking creates keep their artifacts (and
    any spool) in `tmp_path`, MLflow's default being the working directory."""
    monkeypatch.chdir(tmp_path)
    return empty_store(tmp_path)


def test_boring_model_gets_a_finished_run_with_checkpoints_and_says_what_it_lacks(
    uri, tmp_path, caplog
):
    tracking = MlflowTracking(
        tracking_uri=uri, experiment_name="boring", system_metrics=False, draw_in_subprocess=True
    )
    trainer = trainer_for(tracking, limit_train_batches=4, limit_val_batches=2)
    env_before, scratch_before = own_environment(), scratch_dirs()
    children_before = child_pids()
    with caplog.at_level(logging.WARNING, logger="dlharness"):
        trainer.fit(BoringModel())

    run = only_run(uri, "boring")
    assert run.info.status == "FINISHED" and run.info.run_id == tracking.run.run_id
    client = MlflowClient(uri)
    assert stored_epochs(client, run.info.run_id) == [0, 1]
    # Each checkpoint a READY LoggedModel; BoringModel logs no epoch metric to link to them.
    models = checkpoint_models(client, run.info.experiment_id, run.info.run_id)
    assert sorted(models) == [0, 1]
    assert all(m.status == "READY" and not m.metrics for m in models.values())
    assert {"env.accelerator", "torch.version", "mlflow.user", "model.parameters"} <= set(
        run.data.tags
    )
    paths = artifact_paths(client, run.info.run_id)
    assert {"requirements.txt", "model_summary.txt", "plots/loss_curves.png"} <= paths
    assert tracking.job_seconds[PICTURE_HELPER] > 0  # the curves were drawn by the helper
    # What BoringModel does not give, said once each, in one line.
    notes = [r.getMessage() for r in caplog.records]
    assert sum("no epoch-level metrics" in n for n in notes) == 1
    assert sum("no confusion matrix" in n for n in notes) == 1
    assert all("\n" not in n for n in notes)
    # The checkpoint is a Lightning checkpoint of this module, safe to load.
    path = checkpoint_path(run.info.run_id, tracking_uri=uri, dst=tmp_path / "ckpt")
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and set(state["state_dict"]) == set(BoringModel().state_dict())
    # It owned its thread, its picture helper process, its files and nothing else.
    assert dlharness_threads() == []
    assert child_pids() <= children_before
    assert scratch_dirs() <= scratch_before
    assert own_environment() == env_before
    assert type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


def test_external_module_gets_every_epoch_metric_once_params_and_the_best_checkpoint(
    uri, monkeypatch
):
    # MLflow's sampler publishes after each interval (10 s by default) and not at the end: a
    # run this short (0.1–0.5 s on 2 cores) would end before the first one.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    tracking = MlflowTracking(
        tracking_uri=uri, experiment_name="external", monitor="val_loss", keep_last=1
    )
    trainer = trainer_for(tracking, max_epochs=4)
    trainer.fit(ExternalModule(), datamodule=ExternalData())

    client = MlflowClient(uri)
    run = only_run(uri, "external")
    run_id = run.info.run_id
    for key in EXTERNAL_KEYS:
        assert steps(client, run_id, key) == [0, 1, 2, 3], key
    # Per-step values are not epoch values.
    assert not {"train_loss", "train_loss_step"} & set(run.data.metrics)
    params = run.data.params
    assert (params["hidden"], params["lr"], params["batch_size"]) == ("16", "0.05", "16")
    val_loss = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    best = min(val_loss, key=val_loss.get)
    assert run.data.tags[BEST_EPOCH_TAG] == str(best) == str(tracking.best_epoch)
    assert stored_epochs(client, run_id) == sorted({best, 3})
    # The kept checkpoints' models, their metrics linked to them; no dataset was logged.
    models = checkpoint_models(client, run.info.experiment_id, run_id)
    assert sorted(models) == sorted({best, 3})
    for epoch, model in models.items():
        linked = {m.key: m for m in model.metrics}
        assert linked["val_loss"].value == val_loss[epoch]
        assert all(m.model_id == model.model_id and m.dataset_name is None for m in linked.values())
    assert any(key.startswith("system/") for key in run.data.metrics)
    # trainer.test(ckpt_path="best") and validate load the best stored checkpoint.
    [result] = trainer.validate(datamodule=ExternalData(), ckpt_path="best", verbose=False)
    assert result["val_loss"] == pytest.approx(val_loss[best], rel=1e-5)


def test_a_model_that_cannot_be_created_warns_once_and_training_goes_on(uri, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise MlflowException("INVALID_PARAMETER_VALUE: refused by the store")

    monkeypatch.setattr(MlflowClient, "create_logged_model", refuse)
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="refused")
    with caplog.at_level(logging.WARNING, logger="dlharness"):
        trainer_for(tracking, max_epochs=2).fit(ExternalModule(), datamodule=ExternalData())
    run = only_run(uri, "refused")
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED" and stored_epochs(client, run.info.run_id) == [0, 1]
    assert steps(client, run.info.run_id, "val_loss") == [0, 1]  # the values, unlinked
    notes = [r.getMessage() for r in caplog.records if "checkpoint model" in r.getMessage()]
    assert notes == ["MlflowTracking: checkpoint model failed and was skipped: "
                     "INVALID_PARAMETER_VALUE: refused by the store"]  # fmt: skip


def test_turned_off_the_checkpoints_are_no_models(uri):
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="plain", logged_models=False)
    trainer_for(tracking, max_epochs=2).fit(ExternalModule(), datamodule=ExternalData())
    client, run = MlflowClient(uri), only_run(uri, "plain")
    assert stored_epochs(client, run.info.run_id) == [0, 1]
    assert checkpoint_models(client, run.info.experiment_id, run.info.run_id) == {}
    assert "val_loss" in run.data.metrics


@pytest.mark.parametrize(
    ("choose", "expected"),
    [
        (lambda uri, monkeypatch: None, "dlharness"),
        (lambda uri, monkeypatch: mlflow.set_experiment("boring"), "boring"),
        (lambda uri, monkeypatch: monkeypatch.setenv(
            "MLFLOW_EXPERIMENT_ID", MlflowClient(uri).create_experiment("by-id")), "by-id"),
        (lambda uri, monkeypatch: monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "by-name"), "by-name"),
    ],
    ids=["default", "set_experiment", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"],
)  # fmt: skip
def test_a_new_run_goes_where_mlflows_fluent_api_says(uri, monkeypatch, choose, expected):
    mlflow.set_tracking_uri(uri)
    choose(uri, monkeypatch)
    tracking = MlflowTracking(system_metrics=False, plots=False)
    trainer_for(tracking, max_epochs=1).fit(BoringModel())
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(tracking.run.run_id).info.experiment_id)
    assert experiment.name == expected
    # An explicit name wins over all of them.
    named = MlflowTracking(experiment_name="explicit", system_metrics=False, plots=False)
    trainer_for(named, max_epochs=1).fit(BoringModel())
    assert client.get_run(named.run.run_id).info.experiment_id == (
        client.get_experiment_by_name("explicit").experiment_id
    )


def test_an_experiment_id_that_names_nothing_is_one_clear_error(uri, monkeypatch):
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "424242")
    with pytest.raises(ValueError, match="MLFLOW_EXPERIMENT_ID=424242 names no experiment"):
        trainer_for(MlflowTracking(system_metrics=False), max_epochs=1).fit(BoringModel())


def test_inside_an_active_run_it_logs_there_and_leaves_it_open(uri):
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("mine")
    # Stops after epoch 1 (no improvement of 100): the checkpoint period of 5 never comes, the
    # epoch it stops at is stored all the same.
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=100)
    tracking = MlflowTracking(system_metrics=False, every_n_epochs=5)
    with mlflow.start_run() as active:
        trainer_for(tracking, max_epochs=4, others=(stop,)).fit(
            ExternalModule(), datamodule=ExternalData()
        )
        client = MlflowClient(uri)
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
        mlflow.log_metric("my_own", 1.0)
    run = only_run(uri, "mine")
    assert run.info.run_id == active.info.run_id and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val_loss") == [0, 1]
    assert stored_epochs(client, run.info.run_id) == [1]


def test_with_an_mlflow_logger_there_is_one_run(uri, caplog):
    logger = MLFlowLogger(experiment_name="with-logger", tracking_uri=uri)
    tracking = MlflowTracking(system_metrics=False)
    with caplog.at_level(logging.WARNING, logger="dlharness"):
        trainer_for(tracking, logger=logger).fit(ExternalModule(), datamodule=ExternalData())

    run = only_run(uri, "with-logger")
    assert run.info.run_id == logger.run_id == tracking.run.run_id
    client = MlflowClient(uri)
    assert stored_epochs(client, run.info.run_id) == [0, 1]
    # The logger writes the metrics, by global step; no second series at step = epoch.
    logged = steps(client, run.info.run_id, "val_loss")
    assert len(logged) == 2 and 0 not in logged
    assert any("MLFlowLogger logs the metrics" in r.getMessage() for r in caplog.records)


def test_resume_through_checkpoint_path_is_bit_exact_and_continues_the_histories(uri):
    def fit(epochs: int, run_id: str | None = None, name: str = "straight"):
        L.seed_everything(7, workers=True)
        module = ExternalModule()
        tracking = MlflowTracking(
            run_id=run_id, tracking_uri=uri, experiment_name=name, system_metrics=False
        )
        ckpt = checkpoint_path(run_id, tracking_uri=uri) if run_id else None
        trainer_for(tracking, max_epochs=epochs).fit(
            module, datamodule=ExternalData(), ckpt_path=ckpt
        )
        return module, tracking.run.run_id

    straight, straight_id = fit(4)
    _, resumed_id = fit(2, name="resumed")
    resumed, same_id = fit(4, run_id=resumed_id, name="resumed")

    assert same_id == resumed_id
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    client = MlflowClient(uri)
    assert client.get_run(resumed_id).info.status == "FINISHED"
    for key in EXTERNAL_KEYS:
        ours = [(m.step, m.value) for m in client.get_metric_history(resumed_id, key)]
        theirs = [(m.step, m.value) for m in client.get_metric_history(straight_id, key)]
        assert sorted(ours) == sorted(theirs), key


class TemplateStyleModule(L.LightningModule):
    """Laid out like lightning-hydra-template's modules: the network, the optimizer and the
    scheduler passed in (the last two as partials) and kept, objects and all, by
    ``save_hyperparameters(logger=False)``; ReduceLROnPlateau on ``val_loss``."""

    def __init__(self, net: nn.Module, optimizer, scheduler) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net

    forward = ExternalModule.forward
    training_step = ExternalModule.training_step
    validation_step = ExternalModule.validation_step

    def configure_optimizers(self):
        optimizer = self.hparams.optimizer(params=self.parameters())
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"},
        }


def template_parts() -> dict:
    return {
        "net": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
        "optimizer": functools.partial(torch.optim.Adam, lr=0.01),
        "scheduler": functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=0
        ),
    }


def test_a_template_style_module_resumes_exactly_from_its_logged_checkpoint(uri):
    def fit(epochs: int, run_id: str | None = None, name: str = "straight"):
        L.seed_everything(7, workers=True)
        module = TemplateStyleModule(**template_parts())
        tracking = MlflowTracking(
            run_id=run_id, tracking_uri=uri, experiment_name=name, system_metrics=False,
            keep_last=None, plots=False,
        )  # fmt: skip
        ckpt = checkpoint_path(run_id, tracking_uri=uri) if run_id else None
        trainer_for(tracking, max_epochs=epochs).fit(
            module, datamodule=ExternalData(), ckpt_path=ckpt, weights_only=True
        )
        return module, tracking.run.run_id

    straight, straight_id = fit(4)
    _, resumed_id = fit(2, name="resumed")
    resumed, _ = fit(4, run_id=resumed_id, name="resumed")

    ours, theirs = resumed.state_dict(), straight.state_dict()
    assert max((ours[key] - value).abs().max().item() for key, value in theirs.items()) <= 1e-6
    client = MlflowClient(uri)
    for key in EXTERNAL_KEYS:
        mine = sorted((m.step, m.value) for m in client.get_metric_history(resumed_id, key))
        expected = sorted((m.step, m.value) for m in client.get_metric_history(straight_id, key))
        assert [step for step, _ in mine] == [0, 1, 2, 3], key
        assert max(abs(a[1] - b[1]) for a, b in zip(mine, expected, strict=True)) <= 1e-6, key
    # The scheduler halved the rate on a plateau in both (the partials took effect).
    assert (
        resumed.trainer.optimizers[0].param_groups[0]["lr"]
        == (straight.trainer.optimizers[0].param_groups[0]["lr"])
    )

    # The file keeps the plain hyperparameters and says which objects it left out; Lightning's
    # load_from_checkpoint takes those as arguments.
    path = checkpoint_path(straight_id, 3, tracking_uri=uri)
    state = torch.load(path, weights_only=True)
    assert set(state["hyper_parameters"]) == set()
    left_out = state["dlharness_hyperparameters_left_out"]
    assert set(left_out) == {f"hyper_parameters.{k}" for k in ("net", "optimizer", "scheduler")}
    assert "Adam" in left_out["hyper_parameters.optimizer"]
    loaded = TemplateStyleModule.load_from_checkpoint(path, weights_only=True, **template_parts())
    for key, value in straight.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_objects_loads_only_when_trusted(uri, tmp_path):
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="foreign", system_metrics=False)
    trainer_for(tracking, max_epochs=1).fit(ExternalModule(), datamodule=ExternalData())
    run_id = tracking.run.run_id
    # A checkpoint written some other way (an old version, a hand-made file) with an object
    # whose unpickling runs a command, its sha256 record kept consistent.
    artifacts = Path(urlparse(MlflowClient(uri).get_run(run_id).info.artifact_uri).path)
    stored = artifacts / "checkpoints/epoch_0/checkpoint.pth"
    state = torch.load(stored, weights_only=True)
    marker = tmp_path / "payload-ran"
    state["hyper_parameters"]["hook"] = _Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    stored.write_bytes(buffer.getvalue())
    record = json.loads(stored.with_name("checkpoint_metrics.json").read_text())
    record["sha256"] = dlharness.tracking.checkpointing.artifacts.file_sha256(stored)
    stored.with_name("checkpoint_metrics.json").write_text(json.dumps(record))

    with pytest.raises(CheckpointError, match=f"if you trust run {run_id}, pass trusted=True"):
        checkpoint_path(run_id, tracking_uri=uri, dst=tmp_path / "a")
    assert not marker.exists()
    checkpoint_path(run_id, tracking_uri=uri, dst=tmp_path / "b", trusted=True)
    assert marker.exists()  # the user's opt-in loaded the file as it is


def test_a_monitor_never_logged_stops_the_fit_naming_what_was_logged(uri):
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="misuse", monitor="val/loss")
    with pytest.raises(MisconfigurationException, match=r"val/loss.*`val_acc`, `val_loss`"):
        trainer_for(tracking).fit(ExternalModule(), datamodule=ExternalData())
    assert only_run(uri, "misuse").info.status == "FAILED"
    assert dlharness_threads() == []


class FailsInEpoch1(ExternalModule):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise self.error("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("error", "raised", "status"),
    [(RuntimeError, RuntimeError, "FAILED"), (KeyboardInterrupt, SystemExit, "KILLED")],
)
def test_a_failed_or_interrupted_fit_ends_its_run_and_keeps_what_was_stored(
    uri, error, raised, status
):
    scratch_before = scratch_dirs()
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="ends")
    sigint = signal.getsignal(signal.SIGINT)
    # Lightning turns Ctrl-C into a graceful shutdown that ignores SIGINT and exits with 1.
    try:
        with pytest.raises(raised):
            trainer_for(tracking).fit(FailsInEpoch1(error), datamodule=ExternalData())
    finally:
        signal.signal(signal.SIGINT, sigint)
    run = only_run(uri, "ends")
    assert run.info.status == status
    assert stored_epochs(MlflowClient(uri), run.info.run_id) == [0]
    assert dlharness_threads() == [] and scratch_dirs() <= scratch_before


def test_checkpoint_path_refuses_what_it_cannot_vouch_for(uri, tmp_path):
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="refusals", system_metrics=False)
    trainer_for(tracking, max_epochs=1).fit(ExternalModule(), datamodule=ExternalData())
    run_id = tracking.run.run_id
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 5; logged: 0"):
        checkpoint_path(run_id, 5, tracking_uri=uri)
    with pytest.raises(CheckpointError, match=f"run {'0' * 32}"):
        checkpoint_path("0" * 32, tracking_uri=uri)
    artifacts = urlparse(MlflowClient(uri).get_run(run_id).info.artifact_uri).path
    stored = Path(artifacts) / "checkpoints/epoch_0/checkpoint.pth"
    stored.write_bytes(stored.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        checkpoint_path(run_id, tracking_uri=uri, dst=tmp_path)


def test_public_api_is_the_documented_one():
    assert set(dlharness.__all__) >= {"MlflowTracking", "checkpoint_path", "train", "load_config"}
    for name in dlharness.__all__:
        assert getattr(dlharness, name) is not None
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        MlflowTracking(mode="best")
    with pytest.raises(ValueError, match="keep_last"):
        MlflowTracking(keep_last=0)


def test_a_lightning_cli_config_names_it_by_class_path(uri, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "fit.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: dlharness.MlflowTracking
      init_args:
        tracking_uri: {uri}
        experiment_name: cli
        monitor: val_loss
        keep_last: 2
        class_names: [a, b, c]
"""
    )
    cli = LightningCLI(
        ExternalModule, ExternalData, args=["fit", f"--config={config}"], save_config_callback=None
    )
    [tracking] = [c for c in cli.trainer.callbacks if isinstance(c, MlflowTracking)]
    assert (tracking.monitor, tracking.keep_last, tracking.class_names) == (
        "val_loss",
        2,
        ("a", "b", "c"),
    )
    run = only_run(uri, "cli")
    assert run.info.status == "FINISHED" and run.info.run_id == tracking.run.run_id
    assert steps(MlflowClient(uri), run.info.run_id, "val_loss") == [0]

"""`train(cfg)`: one tracked training run, from config to a logged model."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from dlharness.callbacks.epoch_printer import EpochLinePrinter
from dlharness.config import TrainConfig, parse_devices
from dlharness.data import ClassificationDataModule, build_datamodule
from dlharness.errors import UsageError
from dlharness.models.classifier import ClassifierModule
from dlharness.models.nets import build_net, net_spec
from dlharness.tracking.model_logging import log_network
from dlharness.tracking.run import check_tracking_uri, log_config, set_experiment, tracked_run


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    test_metrics: dict[str, float]
    model_uri: str
    module: ClassifierModule


def resolve_accelerator(requested: str) -> str:
    """What `auto` means on this machine, and a clear refusal when the asked device is absent."""
    if requested == "gpu" and not torch.cuda.is_available():
        raise UsageError(
            "--accelerator gpu: torch sees no CUDA GPU here; use --accelerator cpu (or auto)"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            "--accelerator mps: no Apple MPS device here; use --accelerator cpu (or auto)"
        )
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "gpu"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_hardware(cfg: TrainConfig) -> str:
    accelerator = resolve_accelerator(cfg.trainer.accelerator)
    if accelerator == "cpu" and cfg.trainer.precision == "16-mixed":
        raise UsageError("--precision 16-mixed needs a GPU; on CPU use bf16-mixed or 32")
    devices = parse_devices(cfg.trainer.devices)
    if accelerator == "gpu":
        available = torch.cuda.device_count()
        wanted = (
            devices
            if isinstance(devices, int)
            else len(devices)
            if isinstance(devices, list)
            else 1
        )
        if wanted > available:
            raise UsageError(f"--devices {cfg.trainer.devices}: only {available} GPU(s) visible")
    elif isinstance(devices, list):
        raise UsageError(
            f"--devices {cfg.trainer.devices}: device ids are for GPUs; on CPU give a count"
        )
    return accelerator


def build_trainer(cfg: TrainConfig, accelerator: str, callbacks: list[Callback]) -> L.Trainer:
    interactive = sys.stdout.isatty()
    progress: Callback = RichProgressBar() if interactive else EpochLinePrinter()
    return L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=accelerator,
        devices=parse_devices(cfg.trainer.devices),
        precision=cfg.trainer.precision,
        # "warn": deterministic kernels wherever they exist; CUDA ops without one only warn.
        deterministic="warn" if cfg.trainer.deterministic else False,
        # MLflow is the logger (autolog + our callbacks); Lightning's own would log by step.
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=interactive,
        callbacks=[progress, *callbacks],
    )


def build_module(cfg: TrainConfig, datamodule: ClassificationDataModule) -> ClassifierModule:
    spec = net_spec(cfg.model, datamodule.info)
    return ClassifierModule(
        build_net(spec),
        net_spec=spec,
        optimizer=cfg.optim.optimizer,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        scheduler=cfg.optim.scheduler,
        max_epochs=cfg.trainer.max_epochs,
    )


def evaluate(
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    accelerator: str,
    cfg: TrainConfig,
) -> dict[str, float]:
    """Test-split metrics of `module` as it is now, from a trainer of its own.

    A separate trainer keeps autolog's callback (attached to the fit trainer) from logging
    the test metrics a second time at step 0.
    """
    tester = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    results = tester.test(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in results[0].items()}


def train(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate and log one run as `cfg` says; raise `UsageError` for bad input."""
    uri = cfg.resolved_tracking_uri()
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri))
    accelerator = check_hardware(cfg)
    check_tracking_uri(uri)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    # Missing or unreadable data fails here, before an MLflow run exists.
    datamodule.prepare_data()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, datamodule)
    experiment_id = set_experiment(uri, cfg.tracking.experiment)
    # Autolog logs epoch metrics, optimizer params and the model summary; the model itself is
    # logged below with explicit requirements, and checkpoints by our own callback.
    mlflow.pytorch.autolog(
        disable=not cfg.tracking.autolog, log_models=False, checkpoint=False, silent=True
    )
    # Notes that do not apply: in-memory sets need no workers; the pytree one is Lightning's.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")

    with tracked_run(cfg) as run:
        log_config(cfg)
        mlflow.log_params({f"data.n_{split}": n for split, n in datamodule.split_sizes().items()})
        trainer = build_trainer(cfg, accelerator, callbacks=[])
        trainer.fit(module, datamodule=datamodule)
        final_epoch = trainer.current_epoch - 1
        test_metrics = evaluate(module, datamodule, accelerator, cfg)
        mlflow.log_metrics(test_metrics, step=final_epoch)
        example_batch, _ = next(iter(datamodule.test_dataloader()))
        model_info = log_network(module.net, example_batch)

    return TrainResult(
        run_id=run.info.run_id,
        experiment_id=experiment_id,
        tracking_uri=uri,
        test_metrics=test_metrics,
        model_uri=model_info.model_uri,
        module=module,
    )

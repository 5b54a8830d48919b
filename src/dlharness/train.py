"""`train(cfg)`: one tracked training run, from config to a logged model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import ModelSummary
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import dlharness
from dlharness.callbacks.epoch_printer import EpochLinePrinter
from dlharness.callbacks.epoch_tracker import EpochTracker
from dlharness.callbacks.mlflow_checkpoint import MlflowCheckpoint
from dlharness.callbacks.run_context import RunContextLogger
from dlharness.config import TrainConfig, parse_devices
from dlharness.data import ClassificationDataModule, build_datamodule
from dlharness.distributed import is_launch_leader
from dlharness.errors import UsageError
from dlharness.interruption import StopSignals, TrainingInterrupted
from dlharness.models.classifier import ClassifierModule
from dlharness.models.nets import build_net, net_spec
from dlharness.resume import (
    ResumePoint,
    check_same_data,
    load_checkpoint_safely,
    load_stored_checkpoint,
)
from dlharness.tracking.checkpoints import CHECKPOINT_FILE, epoch_dir
from dlharness.tracking.evaluation import evaluate, log_evaluation
from dlharness.tracking.installed_packages import PackageIndex
from dlharness.tracking.model_logging import (
    log_network,
    log_onnx,
    register_candidate,
    save_for_replay,
)
from dlharness.tracking.run import (
    check_tracking_uri,
    log_config,
    set_experiment,
    set_run_tags,
    tracked_run,
)
from dlharness.tracking.spool import SpoolingClient, is_unreachable, set_http_defaults
from dlharness.tracking.worker import StorageError, TrackingWorker, as_storage_error

# Autolog logs epoch metrics when (epoch + 1) % log_every_n_epoch == 0: with this period it
# never does, and keeps logging what else it knows (optimizer params, model summary).
AUTOLOG_NEVER = 2**62
TORCH_DEVICES = {"cpu": "cpu", "gpu": "cuda", "mps": "mps"}


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    test_metrics: dict[str, float]
    evaluated_epoch: int
    # None when the tracking server was down at the end: `dlharness-sync` logs the models.
    model_uri: str | None
    onnx_model_uri: str | None
    registered_version: str | None
    module: ClassifierModule
    # Seconds by phase: "fit" (training with its per-epoch tracking, uploads drained),
    # "checkpoint_save" (on the training thread), "worker/<job>" (CPU seconds of the tracking
    # thread), and the end-of-run "package_index", "evaluation", "model", "onnx", "registry".
    timings: dict[str, float]
    # Where this run's writes wait while the tracking server did not answer; None if it did.
    spooled: Path | None = None


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
        wanted = len(devices) if isinstance(devices, list) else devices
        if isinstance(wanted, int) and wanted > available:
            raise UsageError(f"--devices {cfg.trainer.devices}: only {available} GPU(s) visible")
    elif isinstance(devices, list):
        raise UsageError(
            f"--devices {cfg.trainer.devices}: device ids are for GPUs; on CPU give a count"
        )
    return accelerator


def build_trainer(
    cfg: TrainConfig,
    accelerator: str,
    callbacks: list[Callback],
    checkpoint_io: CheckpointIO | None = None,
) -> L.Trainer:
    interactive = sys.stdout.isatty()
    progress: Callback = RichProgressBar() if interactive else EpochLinePrinter()
    return L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=accelerator,
        devices=parse_devices(cfg.trainer.devices),
        strategy=cfg.trainer.strategy,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        # "warn": deterministic kernels wherever they exist; CUDA ops without one only warn.
        deterministic="warn" if cfg.trainer.deterministic else False,
        # MLflow is the logger (autolog + our callbacks); Lightning's own would log by step.
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=interactive,
        callbacks=[progress, *callbacks],
        plugins=[checkpoint_io] if checkpoint_io else None,
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
        channels_last=cfg.trainer.channels_last,
    )


def finish(
    cfg: TrainConfig,
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    checkpoints: MlflowCheckpoint,
    run: Run,
    device: str,
    timings: dict[str, float],
    client: SpoolingClient,
) -> TrainResult:
    """Evaluate the best stored checkpoint on the test split and log it as the run's model."""
    run_id = run.info.run_id
    started = time.perf_counter()
    epoch = checkpoints.best_epoch
    if epoch is None:
        epoch = checkpoints.stored_epochs[-1]
    local = checkpoints.best_local_copy
    if local is not None:
        state = load_checkpoint_safely(local, f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}")
    else:  # stored by an earlier process of this run
        with tempfile.TemporaryDirectory(prefix="dlharness-best-") as scratch:
            _, state = load_stored_checkpoint(client, run_id, epoch, Path(scratch))
    module.load_state_dict(state["state_dict"])
    evaluation = evaluate(module, datamodule.test_dataloader(), torch.device(device))
    class_names = datamodule.info.class_names
    log_evaluation(client, run_id, evaluation, class_names, epoch)
    set_run_tags(run_id, {"dlharness.evaluated_epoch": str(epoch)}, client)
    timings["evaluation"] = time.perf_counter() - started
    example_batch, _ = next(iter(datamodule.test_dataloader()))
    model_uri = onnx_uri = registered = None
    if not client.offline:
        try:
            model_uri, onnx_uri, registered = _log_models(cfg, module, example_batch, timings)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
    if model_uri is None:
        # The tracking server is down: the models are logged by `dlharness-sync` later.
        with tempfile.TemporaryDirectory(prefix="dlharness-model-") as scratch:
            folder, example = save_for_replay(
                module.net, module.hparams.net_spec, example_batch, Path(scratch) / "model"
            )
            client.spool_final_model(folder, example, cfg.tracker.onnx, cfg.tracking.register_model)
    return TrainResult(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=cfg.tracking.tracking_uri,
        test_metrics=evaluation.metrics,
        evaluated_epoch=epoch,
        model_uri=model_uri,
        onnx_model_uri=onnx_uri,
        registered_version=registered,
        module=module,
        timings=timings,
        spooled=client.spool.folder if client.offline else None,
    )


def _log_models(
    cfg: TrainConfig,
    module: ClassifierModule,
    example_batch: torch.Tensor,
    timings: dict,
) -> tuple[str, str | None, str | None]:
    started = time.perf_counter()
    model_info = log_network(module.net, example_batch)
    timings["model"] = time.perf_counter() - started
    started = time.perf_counter()
    onnx_info = log_onnx(module.net, example_batch) if cfg.tracker.onnx else None
    timings["onnx"] = time.perf_counter() - started
    registered = None
    started = time.perf_counter()
    if cfg.tracking.register_model:
        registered = register_candidate(model_info.model_uri, cfg.tracking.register_model)
    timings["registry"] = time.perf_counter() - started
    return model_info.model_uri, onnx_info.model_uri if onnx_info else None, registered


def process_count(cfg: TrainConfig, accelerator: str) -> int:
    """How many training processes Lightning will run (1 unless DDP)."""
    devices = parse_devices(cfg.trainer.devices)
    if isinstance(devices, list):
        per_node = len(devices)
    elif devices in ("auto", -1):
        # Lightning's "auto" is every GPU, but one process on a CPU.
        per_node = torch.cuda.device_count() if accelerator == "gpu" else 1
        if devices == -1 and accelerator == "cpu":
            per_node = os.cpu_count() or 1
    else:
        per_node = int(devices)
    return per_node * cfg.trainer.num_nodes


def build_callbacks(
    cfg: TrainConfig,
    worker: TrackingWorker,
    run_id: str,
    accelerator: str,
    datamodule: ClassificationDataModule,
    stop: StopSignals | None = None,
    client: SpoolingClient | None = None,
) -> tuple[EpochTracker, MlflowCheckpoint, RunContextLogger]:
    names = datamodule.info.class_names
    tracker = EpochTracker(worker, run_id, names, plots=cfg.tracker.plots, client=client)
    checkpoints = MlflowCheckpoint(
        worker,
        run_id,
        every_n_epochs=cfg.tracker.checkpoint_every_n_epochs,
        keep_last=cfg.tracker.keep_last_checkpoints,
        monitor=cfg.tracker.monitor,
        mode=cfg.tracker.mode,
        stop=stop,
        client=client,
    )
    source = Path(dlharness.__file__).parent
    context = RunContextLogger(worker, run_id, accelerator, source, client=client)
    return tracker, checkpoints, context


def fit(
    cfg: TrainConfig,
    accelerator: str,
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    callbacks: tuple[EpochTracker, MlflowCheckpoint, RunContextLogger],
    resume: ResumePoint | None,
) -> None:
    tracker, checkpoints, context = callbacks
    # The tracker records an epoch's values before the checkpoint of that epoch is taken, so
    # every checkpoint carries the history up to and including its epoch.
    trainer = build_trainer(
        cfg, accelerator, [context, tracker, checkpoints], checkpoints.checkpoint_io
    )
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=resume.checkpoint if resume else None,
        weights_only=True,
    )


def train(cfg: TrainConfig, resume: ResumePoint | None = None) -> TrainResult | None:
    """Train, evaluate and log one run as `cfg` says; raise `UsageError` for bad input.

    With `resume` (from `prepare_resume`, whose config `cfg` is), training continues from
    that checkpoint: in the same run, reopened, or with `resume.fork` in a new one.
    Under DDP only the leading process (global rank 0) opens and logs the run and returns
    its result; every other rank trains its shard in step with it and returns None.
    """
    try:
        if not is_launch_leader():
            _follow(cfg, resume)
            return None
        return _train(cfg, resume)
    finally:
        if resume is not None:
            resume.cleanup()


def _follow(cfg: TrainConfig, resume: ResumePoint | None) -> None:
    accelerator = check_hardware(cfg)
    # Lightning prepares data on each node's local rank 0; the others only read it.
    datamodule = build_datamodule(cfg.data, cfg.seed)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, datamodule)
    _quiet_irrelevant_warnings()
    worker = TrackingWorker()
    try:
        # No run id: the callbacks do their I/O on global rank 0 only.
        callbacks = build_callbacks(cfg, worker, "", accelerator, datamodule)
        fit(cfg, accelerator, module, datamodule, callbacks, resume)
    finally:
        worker.close()


def _quiet_irrelevant_warnings() -> None:
    # Notes that do not apply: in-memory sets need no workers; the pytree one is Lightning's.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")


def _reopens(resume: ResumePoint | None) -> bool:
    """Whether training continues in the resumed run itself (not in a fork, nor a new run)."""
    return resume is not None and not resume.fork


def _train(cfg: TrainConfig, resume: ResumePoint | None) -> TrainResult:
    uri = cfg.resolved_tracking_uri()
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri))
    accelerator = check_hardware(cfg)
    set_http_defaults(uri)
    check_tracking_uri(uri)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    # Missing or unreadable data fails here, before an MLflow run exists.
    datamodule.prepare_data()
    if resume is not None:
        check_same_data(MlflowClient(uri), resume.run_id, datamodule)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, datamodule)
    set_experiment(uri, cfg.tracking.experiment)
    reopen = _reopens(resume)
    # Autolog logs the optimizer's params, the epoch count and the model summary; the epoch
    # tracker logs the epochs, MlflowCheckpoint the checkpoints, `finish` the model.
    mlflow.pytorch.autolog(
        # A reopened run holds autolog's params already; logging `epochs` again would clash.
        disable=not cfg.tracking.autolog or reopen,
        # The epoch tracker logs epoch metrics itself, in order with its checkpoints and
        # exactly once through resumes; autolog buffers them and would log them again.
        log_every_n_epoch=AUTOLOG_NEVER,
        log_models=False,
        checkpoint=False,
        silent=True,
    )
    _quiet_irrelevant_warnings()

    resume_tags = {}
    if resume is not None:
        resume_tags["dlharness.resumed_from_epoch"] = str(resume.epoch)
        if resume.fork:
            resume_tags["dlharness.parent_run_id"] = resume.run_id
    # One process: SIGINT/SIGTERM stop at the next batch with the state stored. Under DDP,
    # Lightning already stops every rank together on SIGTERM (at the next batch).
    stop = StopSignals() if process_count(cfg, accelerator) == 1 else None
    with (
        tracked_run(cfg, resume.run_id if reopen else None, resume_tags) as run,
        stop or contextlib.nullcontext(),
    ):
        run_id = run.info.run_id
        try:
            return _tracked_training(cfg, accelerator, module, datamodule, resume, run, stop)
        except SIGTERMException:
            raise TrainingInterrupted(signal.SIGTERM, " (DDP: at the last checkpoint)") from None
        except TrainingInterrupted as exc:
            exc.run_id, exc.tracking_uri = run_id, uri
            raise
        except StorageError as exc:
            exc.run_id = run_id
            raise


def _tracked_training(
    cfg: TrainConfig,
    accelerator: str,
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    resume: ResumePoint | None,
    run: Run,
    stop: StopSignals | None,
) -> TrainResult:
    reopen = _reopens(resume)
    log_config(cfg, run.data.params if reopen else None)
    mlflow.log_params({f"data.n_{split}": n for split, n in datamodule.split_sizes().items()})
    run_id = run.info.run_id
    client = SpoolingClient(cfg.tracking.tracking_uri, cfg.tracking.spool_dir, run_id)
    worker = TrackingWorker()
    callbacks = build_callbacks(cfg, worker, run_id, accelerator, datamodule, stop, client)
    checkpoints = callbacks[1]
    package_index = PackageIndex()
    try:
        try:
            started = time.perf_counter()
            if stop is not None:
                stop.deferring = True
            fit(cfg, accelerator, module, datamodule, callbacks, resume)
        finally:
            if stop is not None:
                stop.deferring = False
            worker.close()
        # The last epoch's uploads ran after training: they may have met a full disk too.
        worker.check()
        if client.offline and cfg.tracking.autolog and not reopen:
            # Autolog's own end-of-fit write (the model summary) failed with the server down;
            # the same text goes to the spool so that the replayed run lacks nothing.
            with tempfile.TemporaryDirectory(prefix="dlharness-summary-") as scratch:
                summary = Path(scratch) / "model_summary.txt"
                summary.write_text(str(ModelSummary(module, max_depth=-1)))
                client.log_artifact(run_id, str(summary))
        timings = {
            "fit": time.perf_counter() - started,
            "checkpoint_save": checkpoints.save_seconds,
            **{f"worker/{job}": seconds for job, seconds in worker.seconds.items()},
        }
        started = time.perf_counter()
        package_index.install()  # before the first model log of this process
        timings["package_index"] = time.perf_counter() - started
        device = TORCH_DEVICES[accelerator]
        try:
            return finish(cfg, module, datamodule, checkpoints, run, device, timings, client)
        except OSError as exc:
            failure = as_storage_error("logging the evaluation and the model", exc)
            if failure is None:
                raise
            raise failure from None
    finally:
        checkpoints.close()
        package_index.close()

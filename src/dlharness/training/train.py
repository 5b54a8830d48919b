"""`train(cfg)`: one tracked training run, from config to a logged model.

The harness is a user of the public `MlflowTracking` callback like any other: it opens the
run itself (so that the end-of-run evaluation and models land in it too), hands the callback
the config's tracking settings, and adds its own dataset records and best-weights copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from dlharness.callbacks.best_weights import BestWeights
from dlharness.callbacks.dataset_records import DatasetRecords, log_skipped_images
from dlharness.callbacks.early_stop import EarlyStop
from dlharness.callbacks.epoch_printer import EpochLinePrinter
from dlharness.callbacks.mlflow_tracking import MlflowTracking
from dlharness.data import ClassificationDataModule
from dlharness.data.data_version import TAG_MD5, TAG_PATH, data_version, experiment_tags
from dlharness.errors import BadImageError, UsageError
from dlharness.models.classifier import ClassifierModule
from dlharness.serving.model_logging import (
    FINAL_MODEL_OP,
    PACKAGE_DIR,
    ServedClasses,
    log_final_model,
    replay_final_model,
    save_for_replay,
    spool_final_model,
)
from dlharness.tracking.interruption import StopSignals, TrainingInterrupted
from dlharness.tracking.provenance.installed_packages import PackageIndex
from dlharness.tracking.provenance.run_context import set_run_tags
from dlharness.tracking.spool import Spool, SpoolingClient, http_defaults, is_unreachable
from dlharness.tracking.store_access import check_tracking_uri
from dlharness.tracking.worker import StorageError, as_storage_error
from dlharness.training.collector import freeze_before_training
from dlharness.training.components import build_datamodule, build_module
from dlharness.training.config import TrainConfig, parse_devices
from dlharness.training.distributed import is_launch_leader
from dlharness.training.evaluation import evaluate, log_evaluation
from dlharness.training.resume import ResumePoint, check_same_data, stored_state
from dlharness.training.run_lifecycle import (
    log_config,
    restored_environment,
    set_experiment,
    tracked_run,
)

# Lightning imports omegaconf, where it is installed (DVC brings it), when it writes its first
# checkpoint, on the training thread during the first epoch. Imported with the rest, the cost
# moves to start-up (it is not saved) and its objects are frozen with the command's.
with contextlib.suppress(ImportError):
    import omegaconf  # noqa: F401

# Autolog logs epoch metrics when (epoch + 1) % log_every_n_epoch == 0: with this period it
# never does, and keeps logging what else it knows (optimizer params, model summary).
AUTOLOG_NEVER = 2**62
# Why a run ended FAILED, where the harness can say it in one line (a file that cannot be read).
FAILURE_TAG = "dlharness.failure"
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
    # The served classifier (raw images in, class names out); what `register_model` registers.
    classifier_uri: str | None
    registered_version: str | None
    module: ClassifierModule
    # Seconds by phase: "fit" (training with its per-epoch tracking, uploads drained),
    # "checkpoint_save" (on the training thread), "tracking_hooks" (the training thread in
    # MlflowTracking's per-batch and per-epoch hooks, that copy included), "worker/<job>"
    # (CPU seconds of the tracking thread), and the end-of-run "package_index",
    # "evaluation", "model", "onnx", "classifier", "registry".
    timings: dict[str, float]
    # Where this run's writes wait because the tracking server did not answer before the end,
    # and how many; None and 0 once the server has them all.
    spooled: Path | None = None
    spooled_writes: int = 0


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


def build_trainer(cfg: TrainConfig, accelerator: str, callbacks: list[Callback]) -> L.Trainer:
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
        # cuDNN times its convolution algorithms once per input shape and keeps the fastest;
        # the choice can differ between runs, so only where determinism is not asked for.
        benchmark=not cfg.trainer.deterministic,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        # MLflow is the logger (autolog + MlflowTracking); Lightning's own would log by step.
        logger=False,
        enable_progress_bar=interactive,
        callbacks=[progress, *callbacks],
    )


def build_tracking(
    cfg: TrainConfig, class_names: tuple[str, ...], single: bool, accelerator: str
) -> MlflowTracking:
    """The public callback with the config's settings; it logs into the run `train` opened."""
    return MlflowTracking(
        monitor=cfg.tracker.monitor,
        mode=cfg.tracker.mode,
        every_n_epochs=cfg.tracker.checkpoint_every_n_epochs,
        keep_last=cfg.tracker.keep_last_checkpoints,
        plots=cfg.tracker.plots,
        class_names=class_names,
        # `tracked_run` starts MLflow's sampler with the run (tracking.system_metrics).
        system_metrics=False,
        # One process: SIGINT/SIGTERM stop at the next batch with the state stored. Under DDP,
        # Lightning already stops every rank together on SIGTERM (at the next batch).
        checkpoint_on_signal=single,
        fast_images=True,
        # A GPU machine has idle cores, and its training thread, launching kernels, waits for
        # every millisecond the tracking thread holds the interpreter lock. On a CPU run the
        # cores are busy with training: a helper process costs its start-up and saves nothing.
        draw_in_subprocess=accelerator == "gpu",
        spool_dir=cfg.tracking.spool_dir,
        logged_models=cfg.tracker.logged_models,
        source_dir=str(PACKAGE_DIR),
    )


def build_early_stop(cfg: TrainConfig) -> EarlyStop | None:
    if cfg.tracker.early_stop_patience is None:
        return None
    return EarlyStop(
        monitor=cfg.tracker.monitor,
        mode=cfg.tracker.mode,
        patience=cfg.tracker.early_stop_patience,
        min_delta=cfg.tracker.min_delta,
    )


def early_stop_tags(early_stop: EarlyStop | None) -> dict[str, str]:
    """Where and why the fit stopped early, as tags; none when it did not."""
    if early_stop is None or early_stop.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
        return {}
    return {
        "dlharness.stopped_epoch": str(early_stop.stopped_epoch),
        "dlharness.stop_reason": early_stop.stopping_reason_message
        or early_stop.stopping_reason.name,
    }


def finish(
    cfg: TrainConfig,
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    tracking: MlflowTracking,
    best: BestWeights,
    run: Run,
    device: str,
    timings: dict[str, float],
    client: SpoolingClient,
) -> TrainResult:
    """Evaluate the best stored checkpoint on the test split and log it as the run's model."""
    run_id = run.info.run_id
    started = time.perf_counter()
    epoch = tracking.best_epoch
    if epoch is None:
        epoch = tracking.stored_epochs[-1]
    if best.epoch == epoch and best.state is not None:
        module.load_state_dict(best.state)
    else:  # stored by an earlier process of this run
        with tempfile.TemporaryDirectory(prefix="dlharness-best-") as scratch:
            state = stored_state(run_id, epoch, cfg.tracking.tracking_uri, Path(scratch))
        module.load_state_dict(state["state_dict"])
    evaluation = evaluate(module, datamodule.test_dataloader(), torch.device(device))
    class_names = datamodule.info.class_names
    log_evaluation(client, run_id, evaluation, class_names, epoch)
    if datamodule.skip_bad_images:  # every split has been read now
        log_skipped_images(client, run_id, datamodule.skipped_images())
    timings["evaluation"] = time.perf_counter() - started
    example_batch, _ = next(iter(datamodule.test_dataloader()))
    served = ServedClasses.of(datamodule)
    net_spec = module.hparams.net_spec
    logged = None
    if not client.offline:
        try:
            logged = log_final_model(
                module.net, net_spec, served, example_batch, cfg.tracker.onnx,
                cfg.tracking.register_model, timings,
            )  # fmt: skip
        except Exception as exc:
            if not is_unreachable(exc):
                raise
    if logged is None:
        # The tracking server is down: the models are logged by `dlharness-sync` later.
        with tempfile.TemporaryDirectory(prefix="dlharness-model-") as scratch:
            folder, example = save_for_replay(
                module.net, net_spec, served, example_batch, Path(scratch) / "model"
            )
            spool_final_model(
                client, folder, example, cfg.tracker.onnx, cfg.tracking.register_model
            )
    return TrainResult(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=cfg.tracking.tracking_uri,
        test_metrics=evaluation.metrics,
        evaluated_epoch=epoch,
        model_uri=logged and logged.model_uri,
        onnx_model_uri=logged and logged.onnx_model_uri,
        classifier_uri=logged and logged.classifier_uri,
        registered_version=logged and logged.registered_version,
        module=module,
        timings=timings,
    )


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


def train(
    cfg: TrainConfig,
    resume: ResumePoint | None = None,
    *,
    fast_package_index: bool = False,
    callbacks: Sequence[Callback] = (),
) -> TrainResult | None:
    """Train, evaluate and log one run as `cfg` says; raise `UsageError` for bad input.

    With `resume` (from `prepare_resume`, whose config `cfg` is), training continues from
    that checkpoint: in the same run, reopened, or with `resume.fork` in a new one.
    Under DDP only the leading process (global rank 0) opens and logs the run and returns
    its result; every other rank trains its shard in step with it and returns None.
    `fast_package_index` hands MLflow its package index from a per-environment cache (see
    `PackageIndex`: it swaps a function inside MLflow while the index is built), which
    shortens the end of the first run of a process (docs/performance.md). `callbacks` join
    the harness's own in the leading process's Trainer, after the tracking callback (a
    sweep's pruning judge).
    """
    try:
        if not is_launch_leader():
            _follow(cfg, resume)
            return None
        # MLflow's HTTP settings while training, then as the caller had them; so are the
        # variables MLflow's fluent set_tracking_uri and set_experiment set for the process,
        # which would send the caller's next runs (MlflowTracking's too) to this experiment.
        with http_defaults(), restored_environment("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
            return _train(cfg, resume, fast_package_index, list(callbacks))
    finally:
        # Autolog patches Trainer.fit for the whole process: later fits of the caller's own
        # would start autolog runs.
        mlflow.pytorch.autolog(disable=True)
        if resume is not None:
            resume.cleanup()


def _follow(cfg: TrainConfig, resume: ResumePoint | None) -> None:
    accelerator = check_hardware(cfg)
    # Lightning prepares data on each node's local rank 0; the others only read it.
    datamodule = build_datamodule(cfg.data, cfg.seed)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, datamodule)
    _quiet_irrelevant_warnings()
    # The callback does its I/O on global rank 0 only; here it takes part in the collectives.
    tracking = build_tracking(
        cfg, datamodule.info.class_names, single=False, accelerator=accelerator
    )
    early_stop = build_early_stop(cfg)
    trainer = build_trainer(cfg, accelerator, [c for c in (early_stop, tracking) if c])
    freeze_before_training()
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=_checkpoint(resume),
        weights_only=_weights_only(resume),
    )


def _checkpoint(resume: ResumePoint | None) -> Path | None:
    return resume.checkpoint if resume is not None else None


def _weights_only(resume: ResumePoint | None) -> bool:
    # A checkpoint the user vouched for (--trust-checkpoint) may hold objects.
    return not (resume is not None and resume.trusted)


def _quiet_irrelevant_warnings() -> None:
    # Notes that do not apply: in-memory sets need no workers; the pytree one is Lightning's.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")


def _reopens(resume: ResumePoint | None) -> bool:
    """Whether training continues in the resumed run itself (not in a fork, nor a new run)."""
    return resume is not None and not resume.fork


def _train(
    cfg: TrainConfig,
    resume: ResumePoint | None,
    fast_package_index: bool,
    extra_callbacks: list[Callback],
) -> TrainResult:
    uri = cfg.resolved_tracking_uri()
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri))
    accelerator = check_hardware(cfg)
    check_tracking_uri(uri)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    # Missing or unreadable data fails here, before an MLflow run exists.
    datamodule.prepare_data()
    datamodule.setup()
    if resume is not None:
        check_same_data(MlflowClient(uri), resume.run_id, datamodule)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, datamodule)
    set_experiment(uri, cfg.tracking.experiment)
    reopen = _reopens(resume)
    # Autolog logs the optimizer's params, the epoch count and the model summary;
    # MlflowTracking logs the epochs and the checkpoints, `finish` the model.
    mlflow.pytorch.autolog(
        # A reopened run holds autolog's params already; logging `epochs` again would clash.
        disable=not cfg.tracking.autolog or reopen,
        # MlflowTracking logs epoch metrics itself, in order with its checkpoints and exactly
        # once through resumes; autolog buffers them and would log them again.
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
    single = process_count(cfg, accelerator) == 1
    # Outside fit (the evaluation, the model logging) a signal ends the run at once, KILLED;
    # during fit MlflowTracking defers it to the next batch boundary.
    stop = StopSignals() if single else None
    with (
        tracked_run(
            cfg,
            resume.run_id if reopen else None,
            resume_tags,
            {FINAL_MODEL_OP: replay_final_model},
        ) as run,
        stop or contextlib.nullcontext(),
    ):
        run_id = run.info.run_id
        try:
            result = _tracked_training(
                cfg, accelerator, module, datamodule, resume, run, single, fast_package_index,
                extra_callbacks,
            )  # fmt: skip
        except SIGTERMException:
            stopped = TrainingInterrupted(signal.SIGTERM, " (DDP: at the last checkpoint)")
            stopped.run_id, stopped.tracking_uri = run_id, uri
            raise stopped from None
        except TrainingInterrupted as exc:
            exc.run_id, exc.tracking_uri = run_id, uri
            raise
        except StorageError as exc:
            exc.run_id = run_id
            raise
        except BadImageError as exc:
            exc.run_id, exc.tracking_uri = run_id, uri
            mlflow.set_tag(FAILURE_TAG, exc.one_line())
            raise
    waiting = Spool.waiting_in(cfg.tracking.spool_dir, run_id)
    if not waiting:
        return result
    folder = Path(cfg.tracking.spool_dir).resolve() / run_id
    return dataclasses.replace(result, spooled=folder, spooled_writes=waiting)


def _tracked_training(
    cfg: TrainConfig,
    accelerator: str,
    module: ClassifierModule,
    datamodule: ClassificationDataModule,
    resume: ResumePoint | None,
    run: Run,
    single: bool,
    fast_package_index: bool,
    extra_callbacks: list[Callback],
) -> TrainResult:
    run_id = run.info.run_id
    client = SpoolingClient(cfg.tracking.tracking_uri, cfg.tracking.spool_dir, run_id)
    log_config(client, run_id, cfg)
    sizes = {f"data.n_{split}": str(n) for split, n in datamodule.split_sizes().items()}
    client.log_params_once(run_id, sizes)
    spec = module.hparams.net_spec
    set_run_tags(
        run_id, {"model.type": spec["name"], "model.class": type(module.net).__name__}, client
    )
    # The DVC version of the data folder read (bundled sets have none), and the `dvc exp run`.
    version = data_version(cfg.data.data_dir) if Path(datamodule.source).exists() else None
    if tags := {**experiment_tags(), **(version.tags() if version else {})}:
        set_run_tags(run_id, tags, client)
    input_tags = {TAG_MD5: version.md5, TAG_PATH: version.path} if version else {}
    tracking = build_tracking(cfg, datamodule.info.class_names, single, accelerator)
    best = BestWeights(tracking)
    early_stop = build_early_stop(cfg)
    callbacks = [DatasetRecords(tracking, input_tags), early_stop, tracking, best, *extra_callbacks]
    trainer = build_trainer(cfg, accelerator, [c for c in callbacks if c is not None])
    package_index = PackageIndex() if fast_package_index else None
    freeze_before_training()
    try:
        started = time.perf_counter()
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=_checkpoint(resume),
            weights_only=_weights_only(resume),
        )
        if tags := early_stop_tags(early_stop):
            set_run_tags(run_id, tags, client)
        timings = {
            "fit": time.perf_counter() - started,
            "checkpoint_save": tracking.save_seconds,
            "tracking_hooks": tracking.hook_seconds,
            **{f"worker/{job}": seconds for job, seconds in tracking.job_seconds.items()},
        }
        started = time.perf_counter()
        if package_index is not None:
            package_index.install()  # before the first model log of this process
        timings["package_index"] = time.perf_counter() - started
        device = TORCH_DEVICES[accelerator]
        try:
            return finish(cfg, module, datamodule, tracking, best, run, device, timings, client)
        except OSError as exc:
            failure = as_storage_error("logging the evaluation and the model", exc)
            if failure is None:
                raise
            raise failure from None
    finally:
        if package_index is not None:
            package_index.close()

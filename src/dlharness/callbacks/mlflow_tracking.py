"""`MlflowTracking`: everything MLflow's autolog cannot capture, for any Lightning fit."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_summary import ModelSummary
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from typing_extensions import override

from dlharness.errors import first_line
from dlharness.tracking.checkpointing.artifacts import (
    CHECKPOINT_FILE,
    checkpoint_path,
    delete_checkpoint,
    stored_epochs,
    tag_checkpoint,
    upload_checkpoint,
)
from dlharness.tracking.checkpointing.background_io import BackgroundCheckpointIO
from dlharness.tracking.checkpointing.logged_models import (
    MODEL_REPLAYERS,
    CheckpointModels,
    spool_checkpoint_model,
    spool_model_deletion,
)
from dlharness.tracking.checkpointing.rng import capture_rng_state, restore_rng_state
from dlharness.tracking.epoch_history import History, LoggedSteps, log_curve_files
from dlharness.tracking.interruption import StopSignals, TrainingInterrupted
from dlharness.tracking.params import as_param_values
from dlharness.tracking.pictures import charts
from dlharness.tracking.pictures.confusion import ValidationConfusion, predictions_and_targets
from dlharness.tracking.pictures.process import PictureProcess
from dlharness.tracking.pictures.step_images import (
    LOGGED_IMAGES_TAG,
    log_step_image_files,
    step_image_paths,
)
from dlharness.tracking.provenance.run_context import (
    log_environment,
    log_model_description,
    log_source,
)
from dlharness.tracking.run_binding import (
    ACTIVE,
    CONTINUED,
    CREATED,
    FROM_LOGGER,
    BoundRun,
    bind_run,
    status_after,
)
from dlharness.tracking.spool import Spool, SpoolingClient, is_unreachable
from dlharness.tracking.worker import TrackingWorker

log = logging.getLogger(__name__)

CONFUSION_KEY = "val_confusion_matrix"
DEFAULT_SPOOL_DIR = "mlflow-spool"
# Seconds between redraws of the curves (the last epoch always redraws them): the UI charts
# every epoch's values anyway, and on sub-second epochs redrawing each time is a large share
# of what tracking costs.
CURVES_EVERY_S = 5.0
# The key of `job_seconds` for the CPU seconds of the process that draws the pictures.
PICTURE_HELPER = "picture helper process"


def _on_training_thread(hook: Callable[..., None]) -> Callable[..., None]:
    """Count the hook's seconds in `hook_seconds`: time the training thread waits on tracking."""

    @functools.wraps(hook)
    def timed(self: MlflowTracking, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            hook(self, *args, **kwargs)
        finally:
            self.hook_seconds += time.perf_counter() - started

    return timed


class MlflowTracking(Checkpoint):
    """Tracks a Lightning fit in MLflow: per-epoch metrics, checkpoints, pictures and context.

    Add it to any Trainer: ``L.Trainer(callbacks=[MlflowTracking()])``. It logs into the
    Trainer's `MLFlowLogger` run if there is one, else into `run_id` (reopened), else into the
    active MLflow run (``with mlflow.start_run():``), else into a new run that it ends after
    fit: FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM. Runs it did not start
    are left open.

    After every epoch: every epoch-level metric the module logged (``self.log(...,
    on_epoch=True)``, whatever its name) at ``step = epoch``, exactly once through crashes and
    resumes (the history travels in the checkpoints); the validation confusion matrix as an
    image with a step slider, when `validation_step` returns ``{"preds": ..., "target": ...}``
    (labels, or logits with one column per class; ``"targets"`` works too); the loss and
    validation curves. Every `every_n_epochs` epochs and after the last, a full checkpoint
    (with the RNG states an exact resume needs) in MLflow's layout,
    ``checkpoints/epoch_{N}/checkpoint.pth`` beside its sha256 record, keeping the last
    `keep_last` plus the best by `monitor`. Once, when fitting starts: environment and GPU
    tags, system metrics, ``requirements.txt``, the git commit, the model summary, and the
    module's and datamodule's ``save_hyperparameters()`` values as params. What it cannot
    find, it says once, in one line.

    All MLflow I/O runs on one low-priority thread, in order, on global rank 0 only, through
    one client: from the first request a tracking server leaves unanswered, every write goes to
    a local spool (`spool_dir`) at once, and is sent, in order, as soon as the server answers
    again; what still waits when fit ends is named in one line with the ``dlharness-sync``
    command that sends it. A tracking step that fails warns once and training goes on; an
    artifact store that is full or read-only stops training.

    It is a `Checkpoint` callback, so Lightning adds no default ``ModelCheckpoint`` (and
    ``enable_checkpointing=False`` refuses it); ``trainer.test(ckpt_path="best")`` loads the
    best stored checkpoint.

    Args:
        run_id: Continue this run (its histories go on where they stopped).
        tracking_uri: For a new or continued run; else ``$MLFLOW_TRACKING_URI``, else MLflow's
            default.
        experiment_name: For a new run; else the experiment ``mlflow.set_experiment`` made
            active (``$MLFLOW_EXPERIMENT_ID``), else ``$MLFLOW_EXPERIMENT_NAME``, else
            ``dlharness``.
        run_name: For a new run; else an adjective-noun-number name, as MLflow gives.
        tags: Tags of a new run.
        monitor: The metric that picks the best checkpoint (kept beyond `keep_last`); None
            keeps no best. A monitor still unlogged when the first epoch with validation ends
            is an error that names the metrics that were logged.
        mode: ``min`` or ``max``: which direction of `monitor` is better.
        every_n_epochs: Checkpoint period in epochs.
        keep_last: How many of the newest checkpoints to keep; None keeps all.
        plots: Draw the curves and the confusion matrices.
        class_names: Names of the classes, in label order, for the confusion matrix.
        num_classes: The class count when `validation_step` returns labels rather than logits
            (taken from `class_names` when given).
        system_metrics: Sample CPU, memory, disk, network and GPU use as ``system/*`` metrics.
            None: for runs this callback starts or continues and an `MLFlowLogger`'s; an active
            run's are left to whoever started it (``mlflow.start_run(log_system_metrics=True)``).
        checkpoint_on_signal: Install SIGINT and SIGTERM handlers during fit: a signal then
            stores the state at the next batch boundary (mid-epoch, for an exact resume) and
            ends fit with `TrainingInterrupted`. Without it Lightning's own handling applies
            (the run ends KILLED at its last stored checkpoint). Single-process fits only.
        fast_images: Write the confusion-matrix pictures in ``log_image``'s file layout with
            the fastest PNG and WebP settings instead of calling ``log_image`` (less than half
            its CPU time a picture); relies on MLflow's file naming, which a test checks.
        draw_in_subprocess: Draw and encode the pictures (milliseconds of CPU an epoch) in a
            helper process at the lowest priority, which shares no interpreter lock with
            training; it imports PIL and numpy only (a fraction of a second of CPU to start:
            docs/performance.md). Worth it where cores are idle
            and the training thread is the bottleneck (a GPU fit); on a CPU fit that keeps every
            core busy it saves nothing. False draws them on the tracking thread.
        spool_dir: Where writes wait while the tracking server does not answer, a folder per run.
        logged_models: Make each stored checkpoint an MLflow 3 LoggedModel of the run (the
            experiment's Models tab: a row per checkpoint, its epoch's metrics linked to it
            and to the run's dataset of their stage), deleted with its checkpoint; the files
            are then stored twice (the run's and the model's artifacts).
        source_dir: A folder inside the source checkout whose git state is recorded; default:
            the entry script's folder, else the working directory.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        monitor: str | None = None,
        mode: str = "min",
        every_n_epochs: int = 1,
        keep_last: int | None = 5,
        plots: bool = True,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        system_metrics: bool | None = None,
        checkpoint_on_signal: bool = False,
        fast_images: bool = False,
        draw_in_subprocess: bool = False,
        spool_dir: str = DEFAULT_SPOOL_DIR,
        logged_models: bool = True,
        source_dir: str | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if class_names is not None and len(class_names) < 2:
            raise ValueError("class_names must name at least 2 classes")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and num_classes not in (None, len(class_names)):
            raise ValueError(
                f"num_classes {num_classes} contradicts {len(class_names)} class_names"
            )
        if monitor is not None and not monitor.strip():
            raise ValueError("monitor must name a metric, or be None")
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.monitor = monitor
        self.mode = mode
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.plots = plots
        self.class_names = tuple(class_names) if class_names is not None else None
        self.num_classes = num_classes or (len(class_names) if class_names else None)
        self.system_metrics = system_metrics
        self.checkpoint_on_signal = checkpoint_on_signal
        self.fast_images = fast_images
        self.draw_in_subprocess = draw_in_subprocess
        self.spool_dir = spool_dir
        self.logged_models = logged_models
        self.source_dir = source_dir

        # Kept in every checkpoint (state_dict): what an exact, exactly-once resume needs.
        self.history: History = {}
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.stored_epochs: list[int] = []
        self._rng_to_restore: dict[str, Any] | None = None

        # One fit's resources, from `setup` to `teardown` (or `on_exception`).
        self.run: BoundRun | None = None
        self.client: SpoolingClient | None = None
        self._spool: Spool | None = None
        self._worker: TrackingWorker | None = None
        self._pictures: PictureProcess | None = None
        self._scratch: Path | None = None
        self._system_monitor: SystemMetricsMonitor | None = None
        self._stop: StopSignals | None = None
        self._replaced_io: Any = None
        self._fitting = False
        self._released = True
        # Seconds the training thread spent in save_checkpoint (a copy of the tensors; the
        # write and the upload are the worker's), in this callback's per-batch and per-epoch
        # hooks all told (the copy, waits for the worker, confusion counts: what tracking
        # stalls training by, besides sharing the CPU), and CPU seconds of the tracking
        # thread per kind of job, in the last fit.
        self.save_seconds = 0.0
        self.hook_seconds = 0.0
        self.job_seconds: dict[str, float] = {}

        self._logged = LoggedSteps()
        self._confusion = ValidationConfusion(self.num_classes)
        self._epoch_confusion: np.ndarray | None = None
        self._confusion_seen = False
        self._validated_this_epoch = False
        self._monitor_checked = False
        self._step_keys: set[str] = set()
        self._probe: dict[str, Any] | None = None
        self._probed_epoch: int | None = None
        self._curves_drawn_at = -math.inf
        self._images_tagged = False
        self._upload: Future | None = None
        self._said: set[str] = set()
        self._downloaded: dict[int, str] = {}
        self._models: CheckpointModels | None = None
        self._model_params: dict[str, str] = {}

    @property
    @override
    def state_key(self) -> str:
        # One instance per Trainer; a stable key lets a resumed fit find its state.
        return type(self).__name__

    @property
    def logging(self) -> bool:
        """Whether this process writes to MLflow (global rank 0 of a fit that is tracked)."""
        return self._worker is not None

    @property
    def best_model_path(self) -> str:
        """The best stored checkpoint (by `monitor`, else the latest) as a local file, downloaded
        and verified on first use after fit, for ``trainer.test(ckpt_path="best")``; "" while
        fitting, before any checkpoint is stored, and on ranks other than 0."""
        epoch = (
            self.best_epoch
            if self.best_epoch is not None
            else max(self.stored_epochs, default=None)
        )
        if self._fitting or self.run is None or epoch is None:
            return ""
        # Lightning reads it twice per `test(ckpt_path="best")`: one download.
        if epoch not in self._downloaded:
            path = checkpoint_path(self.run.run_id, epoch, tracking_uri=self.run.tracking_uri)
            self._downloaded[epoch] = str(path)
        return self._downloaded[epoch]

    def submit(self, what: str, job: Any, *args: Any) -> Future | None:
        """Run ``job(*args)`` on the tracking thread after everything queued so far; a failure
        warns once per `what`. Does nothing on processes that do not log. Jobs must not run
        torch operations (hand them numpy arrays and files)."""
        if self._worker is None:
            return None
        return self._worker.submit(what, job, *args)

    # Lifecycle

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        if trainer.fast_dev_run:
            self._say("fast_dev_run", "MlflowTracking: fast_dev_run, nothing is tracked")
            return
        self._fitting = True
        self._released = False
        self._reset_fit_state()
        if not trainer.is_global_zero:
            return
        self.run = bind_run(
            trainer, self.run_id, self.tracking_uri, self.experiment_name, self.run_name, self.tags
        )
        run_id, uri = self.run.run_id, self.run.tracking_uri
        # A journal an earlier process left may hold checkpoint models to make.
        self._spool = Spool.open(self.spool_dir, run_id, uri, MODEL_REPLAYERS)
        self.client = SpoolingClient(uri, self.spool_dir, run_id)
        self._worker = TrackingWorker()
        if self.logged_models:
            self._models = CheckpointModels(self.client, run_id, self.run.source != CREATED)
        self._pictures = PictureProcess(in_subprocess=self.draw_in_subprocess)
        self._scratch = Path(tempfile.mkdtemp(prefix="dlharness-checkpoints-"))
        # Checkpoint files of ours are written on the worker; every other save goes through
        # the strategy's own CheckpointIO as before.
        self._replaced_io = trainer.strategy.checkpoint_io
        trainer.strategy.checkpoint_io = BackgroundCheckpointIO(
            self._worker, self._replaced_io, self._scratch
        )
        if self._wants_system_metrics():
            self._system_monitor = SystemMetricsMonitor(
                run_id, tracking_uri=uri, resume_logging=self.run.source == CONTINUED
            )
            self._system_monitor.start()
        if self.checkpoint_on_signal and trainer.world_size == 1:
            self._stop = StopSignals(deferring=True)
            self._stop.__enter__()
        if self.run.source == FROM_LOGGER:
            self._say(
                "logger",
                "MlflowTracking: the Trainer's MLFlowLogger logs the metrics and hyperparameters "
                "(by global step, with an `epoch` metric to chart against); MlflowTracking adds "
                "the rest to its run",
            )
        elif self.run.source != CREATED:
            self._worker.run_now("reading logged metrics", self._logged.read, self.client, run_id)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._finish(trainer, None)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._finish(trainer, exception)

    def _finish(self, trainer: L.Trainer, exception: BaseException | None) -> None:
        """Drain the queue, end a run this callback owns, and release everything."""
        if self._released:
            return
        self._released = True
        self._fitting = False
        late_failure = None
        try:
            if self._worker is not None:
                # Everything queued is stored before the run ends: the last checkpoint too.
                self._worker.close()
                self.job_seconds = dict(self._worker.seconds)
                if self._pictures is not None and self._pictures.helper_seconds:
                    self.job_seconds[PICTURE_HELPER] = self._pictures.helper_seconds
                if exception is None:
                    # The last uploads ran after training: they may have met a full disk too.
                    exception = late_failure = self._worker.storage_error
            if self._system_monitor is not None:
                self._system_monitor.finish()
            if self.client is not None and self._spool is not None and not self._spool.shared:
                # A server that answers again gets what waits before the run's end (whoever
                # holds the spool beside this callback settles it when it ends the run).
                self.client.settle()
            if self.run is not None and self.run.owned and self.client is not None:
                self.client.set_terminated(self.run.run_id, status_after(exception))
        finally:
            self._release(trainer)
        if late_failure is not None:
            raise late_failure

    def _release(self, trainer: L.Trainer) -> None:
        if self._spool is not None:
            waiting, folder = self._spool.close(), self._spool.folder
            self._spool = None
            if waiting:
                self._say("spooled", f"MlflowTracking: the tracking server did not answer "
                          f"before the end: {waiting} writes of run {folder.name} wait in "
                          f"{folder}; once it answers, run: dlharness-sync {folder}")  # fmt: skip
        if self._replaced_io is not None:
            trainer.strategy.checkpoint_io = self._replaced_io
            self._replaced_io = None
        if self._stop is not None:
            self._stop.__exit__(None, None, None)
            self._stop = None
        if self._pictures is not None:
            self._pictures.close()
            self._pictures = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        self._system_monitor = None
        self._worker = None

    def _reset_fit_state(self) -> None:
        # A fit from a checkpoint gets its history and checkpoints back in load_state_dict,
        # which Lightning calls after setup.
        self.history, self.stored_epochs = {}, []
        self.best_epoch = self.best_value = self._rng_to_restore = None
        self.run = self.client = None
        self._downloaded = {}
        self._logged = LoggedSteps()
        self._confusion = ValidationConfusion(self.num_classes)
        self._epoch_confusion = None
        self._confusion_seen = self._validated_this_epoch = self._monitor_checked = False
        self._step_keys, self._probe, self._probed_epoch = set(), None, None
        self._curves_drawn_at = -math.inf
        self._images_tagged = False
        self._upload = None
        self._models, self._model_params = None, {}
        self.save_seconds, self.hook_seconds, self.job_seconds = 0.0, 0.0, {}

    def _wants_system_metrics(self) -> bool:
        assert self.run is not None
        if self.system_metrics is None:
            return self.run.source != ACTIVE
        return self.system_metrics

    # Once, when fitting starts

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._fitting:
            return
        self._restore_rng()
        if not self.logging:
            return
        assert self.run is not None
        client, run_id = self.client, self.run.run_id
        accelerator = _accelerator_name(trainer)
        self.submit(
            "environment tags",
            log_environment,
            client,
            run_id,
            accelerator,
            trainer.num_devices,
            str(trainer.precision),
            trainer.num_nodes,
        )
        self.submit("source and requirements", log_source, client, run_id, self._source_folder())
        hparams = dict(pl_module.hparams)
        if trainer.datamodule is not None:
            for key, value in dict(trainer.datamodule.hparams).items():
                hparams.setdefault(key, value)
        self._model_params = as_param_values(hparams) if hparams else {}
        if self.run.source != FROM_LOGGER:
            if hparams:
                params = self._model_params
                self.submit("hyperparameters", client.log_params_once, run_id, params)
            else:
                self._say("hparams", "MlflowTracking: no hyperparameters to log (the module "
                          "and datamodule call no save_hyperparameters())")  # fmt: skip
        # Summarised here: it may run the module on `example_input_array`.
        summary = str(ModelSummary(pl_module, max_depth=-1))
        model_tags = {
            "model.module_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "model.parameters": sum(p.numel() for p in pl_module.parameters()),
        }
        self.submit("model summary", log_model_description, client, run_id, summary, model_tags)

    def _source_folder(self) -> Path:
        if self.source_dir is not None:
            return Path(self.source_dir)
        script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
        return script.resolve().parent if script is not None and script.is_file() else Path.cwd()

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_back_signals()

    @override
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The sanity check's loaders drew from the global generators since on_fit_start.
        self._restore_rng()

    def _take_back_signals(self) -> None:
        # Lightning installs its SIGTERM handler after `setup`: it would raise at the next
        # validation batch, before the state is stored.
        if self._stop is not None:
            self._stop.take_back()

    def _restore_rng(self) -> None:
        """Put the RNG states of the checkpoint back, just before the first training loader
        draws its shuffling seed: Lightning creates that iterator before on_train_start."""
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._fitting:
            return
        self._take_back_signals()
        self._rng_to_restore = None
        if not self.logging:
            return
        if self.stored_epochs:
            # Resumed: trust the run over the checkpoint's memory (a new run starts with none of
            # the old one's checkpoints; a killed process may not have finished an upload).
            present = self._worker.run_now("reading stored checkpoints", self._present)
            if present is not None:
                self.stored_epochs = [e for e in self.stored_epochs if e in present]
                if self.best_epoch not in present:
                    self.best_epoch = self.best_value = None
        if self.history and self._logs_metrics:
            # Resumed: send what the checkpoint knows and the run does not.
            for epoch, values in sorted(self.history.items()):
                self.submit("epoch metrics", self._logged.send, self.client, self.run.run_id,
                            epoch, dict(values))  # fmt: skip

    def _present(self) -> set[int]:
        return set(stored_epochs(self.client, self.run.run_id))

    @property
    def _logs_metrics(self) -> bool:
        return self.run is not None and self.run.source != FROM_LOGGER

    # Every batch

    @override
    @_on_training_thread
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._fitting and self._probed_epoch != trainer.current_epoch:
            # What changes during the epoch's first batch is logged per step, not per epoch.
            self._probe = dict(trainer.callback_metrics)

    @override
    @_on_training_thread
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._fitting:
            return
        if self._probe is not None:
            before = self._probe
            self._step_keys |= {
                key
                for key, value in trainer.callback_metrics.items()
                if before.get(key) is not value
            }
            self._probe, self._probed_epoch = None, trainer.current_epoch
        if self._worker is not None:
            # A full or read-only artifact store: stop now rather than train for nothing.
            self._worker.check()
        if self._stop is None or self._stop.requested is None:
            return
        done = batch_idx + 1
        if done >= trainer.num_training_batches:
            return  # the epoch's own checkpoint, after validation, is moments away
        epoch = trainer.current_epoch
        self._save(trainer, epoch, {"complete": False, "batches_done": done})
        self._stop_now(f" at epoch {epoch}, batch {done} of {trainer.num_training_batches}")

    @override
    @_on_training_thread
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._fitting or trainer.sanity_checking or not self.plots:
            return
        pair = predictions_and_targets(outputs)
        if pair is None:
            return
        self._confusion_seen = True
        if not self._confusion.update(*pair):
            self._say("confusion-size", "MlflowTracking: no confusion matrix: validation_step "
                      "returns labels, so pass class_names or num_classes")  # fmt: skip

    @override
    @_on_training_thread
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._fitting or trainer.sanity_checking:
            return
        self._validated_this_epoch = True
        # compute() gathers across processes, so every rank calls it.
        if self._confusion.updated:
            self._epoch_confusion = self._confusion.compute()
        self._confusion.reset()
        if self.plots and not self._confusion_seen:
            self._say("confusion", "MlflowTracking: no confusion matrix: validation_step returns "
                      "no dict with 'preds' and 'target' (or 'targets')")  # fmt: skip

    # Every epoch

    @override
    @_on_training_thread
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A Checkpoint callback: this runs after the module's own on_train_epoch_end, so what
        # the module logs there is seen too.
        if not self._fitting:
            return
        epoch = trainer.current_epoch
        metrics = trainer.callback_metrics
        self._check_monitor(trainer, metrics)
        values = self._epoch_values(metrics)
        self.history[epoch] = values
        last = epoch + 1 >= _max_epochs(trainer) or trainer.should_stop
        stopping = self._stop is not None and self._stop.requested is not None
        checkpointing = not (epoch + 1) % self.every_n_epochs or last or stopping
        if checkpointing:
            # The epoch's values go with its checkpoint's tags, in one database write.
            self._update_best(epoch, metrics)
            self._save(trainer, epoch, {**values, "complete": True}, values)
        elif self.logging and self._logs_metrics and values:
            self.submit("epoch metrics", self._logged.send, self.client, self.run.run_id,
                        epoch, values)  # fmt: skip
        if self.logging and self.plots:
            # Queued after the checkpoint: the next epoch's wait for this upload never waits
            # for pictures as well.
            self._log_pictures(trainer, epoch)
        self._epoch_confusion = None
        self._validated_this_epoch = False
        if stopping:
            self._stop_now(f" after epoch {epoch}")

    def _epoch_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = {}
        for key, value in metrics.items():
            if key in self._step_keys:
                continue
            number = _scalar(value)
            if number is not None:
                values[key] = number
        if not values:
            self._say("no-metrics", "MlflowTracking: no epoch-level metrics were logged; log them "
                      "with self.log(name, value, on_epoch=True)")  # fmt: skip
        return values

    def _check_monitor(self, trainer: L.Trainer, metrics: Mapping[str, Any]) -> None:
        if self.monitor is None or self._monitor_checked:
            return
        if not (self._validated_this_epoch or not trainer.enable_validation):
            return  # its value may come from the first validation, still to run
        self._monitor_checked = True
        if self.monitor not in metrics:
            logged = ", ".join(f"`{key}`" for key in sorted(metrics)) or "none"
            raise MisconfigurationException(
                f"MlflowTracking(monitor={self.monitor!r}): no such metric was logged by the end "
                f"of epoch {trainer.current_epoch}; pass one of: {logged}"
            )

    def _log_pictures(self, trainer: L.Trainer, epoch: int) -> None:
        now = time.monotonic()
        final = epoch + 1 >= _max_epochs(trainer) or trainer.should_stop
        if final or now - self._curves_drawn_at >= CURVES_EVERY_S:
            self._curves_drawn_at = now
            snapshot = {e: dict(v) for e, v in self.history.items()}
            self.submit("epoch plots", self._log_curves, snapshot)
        if self._epoch_confusion is not None:
            self.submit("confusion matrix image", self._log_confusion, epoch, self._epoch_confusion)

    def _log_curves(self, history: History) -> None:
        with tempfile.TemporaryDirectory(prefix="dlharness-plots-") as scratch:
            self._pictures.draw("curves", history, Path(scratch))
            log_curve_files(self.client, self.run.run_id, Path(scratch))

    def _log_confusion(self, epoch: int, matrix: np.ndarray) -> None:
        names = self.class_names or tuple(str(i) for i in range(len(matrix)))
        title = f"Validation confusion matrix, epoch {epoch}"
        run_id = self.run.run_id
        if not self.fast_images:
            image = charts.confusion_chart(matrix, names, title)
            self.client.log_image(run_id, image, key=CONFUSION_KEY, step=epoch)
            return
        with tempfile.TemporaryDirectory(prefix="dlharness-image-") as scratch:
            png, webp = step_image_paths(Path(scratch), CONFUSION_KEY, epoch)
            self._pictures.draw("confusion", matrix, names, title, png, webp)
            log_step_image_files(self.client, run_id, png, webp)
        if not self._images_tagged:
            self.client.set_tag(run_id, LOGGED_IMAGES_TAG, "True")
            self._images_tagged = True

    # Checkpoints

    def _update_best(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        value = _scalar(metrics.get(self.monitor)) if self.monitor else None
        if value is None or math.isnan(value):
            return
        better = (
            self.best_value is None
            or (self.mode == "min" and value < self.best_value)
            or (self.mode == "max" and value > self.best_value)
        )
        if better:
            self.best_epoch, self.best_value = epoch, value

    def _beyond_retention(self) -> list[int]:
        if self.keep_last is None:
            return []
        kept = set(self.stored_epochs[-self.keep_last :]) | {self.best_epoch}
        return [epoch for epoch in self.stored_epochs if epoch not in kept]

    def _save(
        self,
        trainer: L.Trainer,
        epoch: int,
        record: dict[str, Any],
        values: dict[str, float] | None = None,
    ) -> None:
        """Take the checkpoint of `epoch` (every rank takes part) and queue its upload, with
        the epoch's metric `values` when given."""
        if epoch not in self.stored_epochs:  # a resumed, once interrupted epoch is stored again
            self.stored_epochs.append(epoch)
        doomed = self._beyond_retention()
        self.stored_epochs = [e for e in self.stored_epochs if e not in doomed]
        if self._scratch is None:
            # Not rank 0: save_checkpoint synchronises the ranks, and only rank 0 writes.
            trainer.save_checkpoint(os.devnull, weights_only=False)
            return
        folder = self._scratch / f"epoch_{epoch}"
        folder.mkdir(exist_ok=True)
        partial = folder / f"{CHECKPOINT_FILE}.partial"
        start = time.perf_counter()
        trainer.save_checkpoint(partial, weights_only=False)
        self.save_seconds += time.perf_counter() - start
        # One upload in flight at most: the low-priority tracking thread may fall behind
        # training, but never by more than this (what a crash can lose, how late a full disk
        # is noticed). Its jobs run in order, so everything queued before is done as well.
        if self._upload is not None:
            self._upload.result()
        record = {**record, "epoch": epoch, "global_step": trainer.global_step}
        if not self._logs_metrics:
            values = None
        best = self.best_epoch
        self._upload = self.submit(
            "checkpoint upload", self._store, epoch, partial, record, best, doomed, values
        )

    def _store(
        self,
        epoch: int,
        partial: Path,
        record: dict[str, Any],
        best: int | None,
        doomed: list[int],
        values: dict[str, float] | None,
    ) -> None:
        run_id = self.run.run_id
        metrics = self._logged.unsent(epoch, values) if values else []
        model_id, spooled = None, False
        try:
            record = upload_checkpoint(self.client, run_id, epoch, partial, record)
            model_id, spooled = self._checkpoint_model(epoch, partial.parent, record, best)
            if model_id is not None:
                metrics = self._models.link(metrics, model_id)
            elif spooled:
                # The values travel with the spooled model, linked to it when it is made.
                spool_checkpoint_model(
                    self.client, epoch, partial.parent, record, self._model_params,
                    self.monitor, metrics, best,
                )  # fmt: skip
            tag_checkpoint(self.client, run_id, epoch, best, [] if spooled else metrics)
        except Exception:
            # The epoch's values are kept even when its checkpoint is not; the checkpoint's
            # failure is the one reported.
            if metrics and not spooled:
                with contextlib.suppress(Exception):
                    self._logged.send(self.client, run_id, epoch, values)
            raise
        self._logged.mark_sent(metrics)
        shutil.rmtree(partial.parent, ignore_errors=True)
        if model_id is not None:
            self._model_step("checkpoint model tags", self._models.stored, epoch, best)
        for old in doomed:
            delete_checkpoint(self.client, run_id, old)
            if self._models is None:
                continue
            if self.client.offline:
                spool_model_deletion(self.client, old)
            else:
                self._model_step("checkpoint model deletion", self._models.delete, old)

    def _checkpoint_model(
        self, epoch: int, folder: Path, record: dict[str, Any], best: int | None
    ) -> tuple[str | None, bool]:
        """(epoch `epoch`'s LoggedModel, whether to spool it instead): none when turned off or
        when its creation failed (said once; training goes on); spooled while the server does
        not answer (a model needs the id it answers with)."""
        if self._models is None:
            return None, False
        if not self.client.offline:
            models, params, monitor = self._models, self._model_params, self.monitor
            try:
                made = self.client.request(
                    lambda: models.create(epoch, folder, record, params, monitor, best)
                )
                return made, False
            except Exception as exc:
                if not is_unreachable(exc):
                    self._say("checkpoint model", "MlflowTracking: checkpoint model failed and "
                              f"was skipped: {first_line(exc)}")  # fmt: skip
                    return None, False
        self._models.stale()
        return None, True

    def _model_step(self, what: str, step: Callable[..., Any], *args: Any) -> Any:
        try:
            return step(*args)
        except Exception as exc:
            self._say(what, f"MlflowTracking: {what} failed and was skipped: {first_line(exc)}")
            return None

    def _stop_now(self, where: str) -> None:
        """Wait until the checkpoint just taken is stored, then end training."""
        assert self._stop is not None and self._stop.requested is not None
        if self._worker is not None:
            self._worker.flush()
        raise TrainingInterrupted(self._stop.requested, where)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {epoch: dict(values) for epoch, values in self.history.items()},
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "stored_epochs": list(self.stored_epochs),
            "rng": capture_rng_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): dict(v) for e, v in state_dict["history"].items()}
        self.best_epoch = state_dict["best_epoch"]
        self.best_value = state_dict["best_value"]
        self.stored_epochs = list(state_dict["stored_epochs"])
        self._rng_to_restore = state_dict["rng"]

    @rank_zero_only
    def _say(self, what: str, message: str) -> None:
        """One line, once per callback, on global rank 0."""
        if what in self._said:
            return
        self._said.add(what)
        log.warning(message)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _max_epochs(trainer: L.Trainer) -> float:
    # Lightning's -1 (or None with max_steps) means no epoch limit.
    limit = trainer.max_epochs
    return math.inf if limit is None or limit < 0 else limit


def _accelerator_name(trainer: L.Trainer) -> str:
    if isinstance(trainer.accelerator, CUDAAccelerator):
        return "gpu"
    return "mps" if isinstance(trainer.accelerator, MPSAccelerator) else "cpu"

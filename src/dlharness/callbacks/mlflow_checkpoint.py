"""Full, resumable checkpoints stored in the MLflow run, in MLflow's own layout."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
from typing_extensions import override

from dlharness.config import TrackingConfig
from dlharness.interruption import StopSignals, TrainingInterrupted
from dlharness.tracking.checkpoint_io import BackgroundCheckpointIO
from dlharness.tracking.checkpoints import (
    BEST_EPOCH_TAG,
    CHECKPOINT_FILE,
    LATEST_CHECKPOINT_TAG,
    METRICS_FILE,
    epoch_dir,
    file_sha256,
    stored_epochs,
)
from dlharness.tracking.rng import capture_rng_state, restore_rng_state
from dlharness.tracking.run import set_run_tags
from dlharness.tracking.spool import SpoolingClient
from dlharness.tracking.worker import TrackingWorker


class MlflowCheckpoint(L.Callback):
    """Logs a Lightning checkpoint every `every_n_epochs` epochs, and after the last one.

    Each lands in ``checkpoints/epoch_{N}/checkpoint.pth`` beside ``checkpoint_metrics.json``
    (the epoch's metrics, global step, size and sha256), the layout autolog uses, so
    ``mlflow.pytorch.load_checkpoint(ClassifierModule, run_id, epoch=N)`` loads it. The file
    holds weights, optimizer, scheduler, loop counters, every callback's state and, through
    this callback's state, the RNG states an exact resume needs. The JSON is written after the
    checkpoint file, so a checkpoint counts as stored only once its JSON exists. Give the
    Trainer `checkpoint_io` as a plugin and the files are written on the worker too.

    Retention keeps the last `keep_last` stored checkpoints plus the best one by `monitor`.

    Args:
        worker: Runs the uploads off the training thread, in order.
        run_id: The MLflow run the checkpoints belong to.
        every_n_epochs: Checkpoint period in epochs.
        keep_last: How many of the newest checkpoints to keep; None keeps all.
        monitor: Metric that decides the best checkpoint, e.g. ``val/loss``.
        mode: ``min`` or ``max``: which direction of `monitor` is better.
        stop: SIGINT/SIGTERM requests to honour: at the next batch boundary the state is
            stored (``complete: false`` in the record when mid-epoch) and training ends with
            `TrainingInterrupted`. None for DDP, where Lightning stops all ranks together.
        client: The client to write with: a `SpoolingClient`, which keeps writes through an
            outage and deletes the checkpoints retention drops; by default one for the
            current tracking URI and the default spool folder.
    """

    def __init__(
        self,
        worker: TrackingWorker,
        run_id: str,
        every_n_epochs: int = 1,
        keep_last: int | None = 5,
        monitor: str = "val/loss",
        mode: str = "min",
        stop: StopSignals | None = None,
        client: SpoolingClient | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.worker = worker
        self.run_id = run_id
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.stop = stop
        # For the Trainer's plugins: the files are then written on the worker.
        self.checkpoint_io = BackgroundCheckpointIO(worker)
        self.client = client or SpoolingClient(
            mlflow.get_tracking_uri(), TrackingConfig.spool_dir, run_id
        )
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.stored_epochs: list[int] = []
        self._rng_to_restore: dict[str, Any] | None = None
        self._scratch: Path | None = None
        # Seconds the training thread spent in save_checkpoint (a copy of the tensors with
        # `checkpoint_io`; the write and the upload are then the worker's).
        self.save_seconds = 0.0
        self._upload: Future | None = None
        self._best_copy: Path | None = None
        self.best_copy_epoch: int | None = None

    @property
    @override
    def state_key(self) -> str:
        # One instance per trainer; a stable key lets a resumed run find its state.
        return type(self).__name__

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._scratch = Path(tempfile.mkdtemp(prefix="dlharness-checkpoints-"))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._scratch is not None:
            self.worker.flush()
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, not in load_state_dict: the sanity-check validation that runs in
        # between draws from the global generator and would shift every later draw.
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if trainer.is_global_zero and self.stored_epochs:
            # Resumed: trust the run over the checkpoint's memory (a fork starts with none of
            # the parent's checkpoints; a killed process may not have finished an upload).
            present = self.worker.run_now("reading stored checkpoints", self._present)
            if present is not None:
                self.stored_epochs = [e for e in self.stored_epochs if e in present]
                if self.best_epoch not in present:
                    self.best_epoch = self.best_value = None

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # A full or read-only artifact store: stop now rather than train for nothing.
        self.worker.check()
        if self.stop is None or self.stop.requested is None:
            return
        done = batch_idx + 1
        if done >= trainer.num_training_batches:
            return  # the epoch's own checkpoint, after validation, is moments away
        epoch = trainer.current_epoch
        self._save(trainer, epoch, {"complete": False, "batches_done": done})
        self._stop_now(f" at epoch {epoch}, batch {done} of {trainer.num_training_batches}")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch
        is_last = epoch + 1 >= (trainer.max_epochs or math.inf)
        stopping = self.stop is not None and self.stop.requested is not None
        if (epoch + 1) % self.every_n_epochs and not is_last and not stopping:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        self._update_best(epoch, metrics)
        self._save(trainer, epoch, {**metrics, "complete": True})
        if stopping:
            self._stop_now(f" after epoch {epoch}")

    def _save(self, trainer: L.Trainer, epoch: int, record: dict[str, Any]) -> None:
        """Write the checkpoint of `epoch` (every rank takes part) and queue its upload."""
        if epoch not in self.stored_epochs:  # a resumed, once interrupted epoch is stored again
            self.stored_epochs.append(epoch)
        doomed = self._beyond_retention()
        self.stored_epochs = [e for e in self.stored_epochs if e not in doomed]

        assert self._scratch is not None
        folder = self._scratch / f"epoch_{epoch}"
        folder.mkdir(exist_ok=True)
        partial = folder / f"{CHECKPOINT_FILE}.partial"
        # Every rank must call save_checkpoint (it synchronises them); only rank 0 writes,
        # with `checkpoint_io` on the worker, else here.
        start = time.perf_counter()
        trainer.save_checkpoint(partial, weights_only=False)
        self.save_seconds += time.perf_counter() - start
        if not trainer.is_global_zero:
            return
        # One upload in flight at most: the low-priority tracking thread may fall behind
        # training, but never by more than this (what a crash can lose, how late a full disk
        # is noticed). Its jobs run in order, so everything queued before is done as well.
        if self._upload is not None:
            self._upload.result()
        self._upload = self.worker.submit(
            "checkpoint upload",
            self._store,
            epoch,
            partial,
            {**record, "epoch": epoch, "global_step": trainer.global_step},
            self.best_epoch,
            doomed,
        )

    def _stop_now(self, where: str) -> None:
        """Wait until the checkpoint just taken is stored, then end training."""
        assert self.stop is not None and self.stop.requested is not None
        self.worker.flush()
        raise TrainingInterrupted(self.stop.requested, where)

    def _present(self) -> set[int]:
        return set(stored_epochs(self.client, self.run_id))

    def _update_best(self, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
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

    def _store(
        self, epoch: int, partial: Path, record: dict[str, Any], best: int | None, doomed: list[int]
    ) -> None:
        client = self.client
        path = partial.with_name(CHECKPOINT_FILE)
        os.replace(partial, path)  # a complete file or none, never half of one
        record = {**record, "sha256": file_sha256(path), "size_bytes": path.stat().st_size}
        path.with_name(METRICS_FILE).write_text(json.dumps(record))
        try:
            client.log_artifact(self.run_id, str(path), epoch_dir(epoch))
            # The record goes last: a checkpoint without it is incomplete and never resumed from.
            client.log_artifact(self.run_id, str(path.with_name(METRICS_FILE)), epoch_dir(epoch))
        except OSError:
            # A half-copied file on a full disk: take it away (best effort) and say why.
            with contextlib.suppress(Exception):
                self._delete(epoch)
            raise
        tags = {LATEST_CHECKPOINT_TAG: f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}"}
        if best is not None:
            tags[BEST_EPOCH_TAG] = str(best)
        set_run_tags(self.run_id, tags, client)
        if epoch == best:
            # Kept for the end-of-run evaluation, which then needs no download.
            if self._best_copy is None:
                self._best_copy = Path(tempfile.mkdtemp(prefix="dlharness-best-")) / CHECKPOINT_FILE
            os.replace(path, self._best_copy)
            self.best_copy_epoch = epoch
        shutil.rmtree(path.parent, ignore_errors=True)
        for old in doomed:
            self._delete(old)

    def _delete(self, epoch: int) -> None:
        self.client.delete_artifacts(self.run_id, epoch_dir(epoch))

    @property
    def best_local_copy(self) -> Path | None:
        """The best checkpoint's file, when this process stored it (else None)."""
        if self.best_copy_epoch is not None and self.best_copy_epoch == self.best_epoch:
            return self._best_copy
        return None

    def close(self) -> None:
        """Remove the local copy of the best checkpoint (after the end-of-run evaluation)."""
        if self._best_copy is not None:
            shutil.rmtree(self._best_copy.parent, ignore_errors=True)
            self._best_copy = self.best_copy_epoch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "stored_epochs": list(self.stored_epochs),
            "rng": capture_rng_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_epoch = state_dict["best_epoch"]
        self.best_value = state_dict["best_value"]
        self.stored_epochs = list(state_dict["stored_epochs"])
        self._rng_to_restore = state_dict["rng"]

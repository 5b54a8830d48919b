"""Plain one-line-per-epoch progress, for logs and CI where a live progress bar is noise."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

DEFAULT_KEYS = ("train/loss", "val/loss", "val/acc", "val/f1")


class EpochLinePrinter(L.Callback):
    """Prints ``epoch 3/20  train/loss 0.4120  val/loss 0.3310  ...  1.2 s`` after each epoch.

    Args:
        keys: Metrics to show, in order; keys not logged yet are left out.
        stream: Where to write; standard output by default.
    """

    def __init__(self, keys: Sequence[str] = DEFAULT_KEYS, stream: TextIO | None = None) -> None:
        if isinstance(keys, str) or not keys:
            raise ValueError("keys must be a non-empty sequence of metric names")
        self.keys = tuple(keys)
        self.stream = stream
        self._epoch_start = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed in the middle of an epoch gets no on_train_epoch_start for it.
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @override
    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{key} {float(metrics[key]):.4f}" for key in self.keys if key in metrics)
        seconds = time.perf_counter() - self._epoch_start
        line = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}  {seconds:.1f} s"
        print(line, file=self.stream or sys.stdout, flush=True)

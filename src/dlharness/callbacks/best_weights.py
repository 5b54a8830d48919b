"""The best epoch's weights kept in memory for the end-of-run evaluation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from dlharness.callbacks.mlflow_tracking import MlflowTracking


class BestWeights(Checkpoint):
    """A CPU copy of the module's weights at the best epoch `tracking` has picked, so that the
    end-of-run evaluation needs no download (nor a tracking server that answers).

    A `Checkpoint` callback, listed after `tracking`: Lightning runs it after `tracking` has
    judged the epoch.
    """

    def __init__(self, tracking: MlflowTracking) -> None:
        self.tracking = tracking
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = self.tracking.best_epoch
        if trainer.is_global_zero and best == trainer.current_epoch and best != self.epoch:
            self.epoch = best
            self.state = {
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
            }

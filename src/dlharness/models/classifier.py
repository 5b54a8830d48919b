"""The LightningModule: any image-classification network, its optimiser and its metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from dlharness.models.nets import build_net

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def classification_metrics(num_classes: int, sync_on_compute: bool = True) -> MetricCollection:
    """The metrics of every stage; `sync_on_compute=False` for one process's own evaluation.

    Without torchmetrics' input checks (`validate_args`): they count the distinct labels of
    every batch, which on a GPU makes the host wait for the batch to finish before it can
    queue the next. The predictions are softmax outputs, and a label out of range already
    fails in the same step's `cross_entropy`.
    """
    options = {"sync_on_compute": sync_on_compute, "validate_args": False}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", **options),
            "precision": MulticlassPrecision(num_classes, average="macro", **options),
            "recall": MulticlassRecall(num_classes, average="macro", **options),
            "f1": MulticlassF1Score(num_classes, average="macro", **options),
            "auroc": MulticlassAUROC(num_classes, average="macro", **options),
        }
    )


class SampleMean(Metric):
    """The epoch's mean of a per-batch mean, each batch weighted by its sample count.

    torchmetrics' `MeanMetric` does the same but tests every batch for NaN, which reads a
    value back from the device, and with that test turned off it drops the weights
    (torchmetrics 1.9). A NaN here makes the epoch's mean NaN, as a diverged loss should.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total += value.detach().float() * weight
        self.count += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class ClassifierModule(L.LightningModule):
    """Trains `net` with cross-entropy and logs ``{stage}/{metric}`` once per epoch.

    Args:
        net: The network. When None it is rebuilt from `net_spec`, which is how a checkpoint
            restores it (the network object itself is not a hyperparameter).
        net_spec: The description `build_net` understands; also sizes the metrics.
        optimizer: One of ``adam``, ``adamw``, ``sgd``.
        lr: Learning rate.
        weight_decay: L2 penalty (decoupled for adamw).
        momentum: SGD momentum; ignored by the Adam family.
        scheduler: ``cosine`` anneals the rate to 0 over the trainer's `max_epochs` (read each
            epoch, so a resumed run given more epochs anneals over its new length);
            ``none`` keeps it fixed.
        warmup_epochs: Epochs of linear warm-up before the schedule: epoch ``e < W`` trains
            at ``lr * (e + 1) / (W + 1)``; the cosine then spans the epochs after it.
        channels_last: Keep weights and batches in NHWC order, which tensor-core convolutions
            read without a transpose.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        net_spec: dict[str, Any],
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else build_net(net_spec)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        metrics = classification_metrics(net_spec["num_classes"])
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Sample-weighted means over the epoch (across processes under DDP).
        self.train_loss, self.val_loss, self.test_loss = SampleMean(), SampleMean(), SampleMean()
        self._train_logged_epoch: int | None = None
        self._compiled_net: Callable[[torch.Tensor], torch.Tensor] | None = None

    def compile_network(self, **options: Any) -> None:
        """Run the network through `torch.compile(**options)` from now on.

        The compiled callable is kept beside `net`, not registered as a submodule (as
        `torch.compile(net)` would be), so the weights, their `state_dict` keys, checkpoints
        and the logged `net` are the same as without it. The metrics and Lightning's hooks stay
        uncompiled: the network is where the time goes.
        """
        self._compiled_net = torch.compile(self.net.__call__, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_net is not None:
            return self._compiled_net(x)
        return self.net(x)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x.contiguous(memory_format=self.memory_format))
        loss = F.cross_entropy(logits, y)
        # Metrics in float32 whatever the training precision: AUROC sorts probabilities.
        getattr(self, f"{stage}_metrics").update(logits.detach().float().softmax(dim=-1), y)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(y))
        # Predictions go to callbacks (the epoch tracker's confusion matrix).
        return {"loss": loss, "preds": logits.detach().argmax(dim=-1), "target": y}

    def _log_epoch_metrics(self, stage: str) -> None:
        """Hand Lightning this stage's metric objects for the epoch now under way.

        Lightning keeps them until the epoch ends, then computes, logs and resets them: one
        value per epoch (logged by MLflow at step = epoch). Logging them once per epoch, not
        per batch, spares Lightning's per-call bookkeeping (7 calls a batch).
        """
        loss = getattr(self, f"{stage}_loss")
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(getattr(self, f"{stage}_metrics"), on_step=False, on_epoch=True,
                      prog_bar=stage == "val")  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def on_train_start(self) -> None:
        # A second `fit` of this module starts its epochs at 0 again.
        self._train_logged_epoch = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # At the first batch this process trains in each epoch, not at the epoch's start: a
        # run resumed mid-epoch gets no on_train_epoch_start.
        if self._train_logged_epoch == self.current_epoch:
            return
        self._train_logged_epoch = self.current_epoch
        self._log_epoch_metrics("train")
        # Equal on every rank; the sync only keeps Lightning from warning under DDP.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer == "sgd":
            kwargs["momentum"] = hp.momentum
        optimizer = OPTIMIZERS[hp.optimizer](self.parameters(), **kwargs)
        if hp.scheduler == "none" and not hp.get("warmup_epochs", 0):
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "epoch"},
        }

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base rate at `epoch`: a linear warm-up over `warmup_epochs`, then
        1 falling to 0 after the last epoch (cosine), or 1 throughout (none)."""
        # Checkpoints from before warm-up existed have no such hyperparameter.
        warmup = self.hparams.get("warmup_epochs", 0)
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if self.hparams.scheduler == "none":
            return 1.0
        total = max(1, self.trainer.max_epochs - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(epoch - warmup, total) / total))

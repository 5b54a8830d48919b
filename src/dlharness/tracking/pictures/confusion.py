"""The validation confusion matrix, gathered from what `validation_step` returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

# What `validation_step` returns for a confusion matrix: predictions (class labels, or logits /
# probabilities with one column per class) and the true labels under either name.
PREDS_KEY = "preds"
TARGET_KEYS = ("target", "targets")


def predictions_and_targets(outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(preds, target) when `outputs` follows the convention, else None."""
    if not isinstance(outputs, Mapping) or PREDS_KEY not in outputs:
        return None
    target = next((outputs[key] for key in TARGET_KEYS if key in outputs), None)
    preds = outputs[PREDS_KEY]
    if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    return preds, target


class ValidationConfusion:
    """Counts one validation epoch's (true, predicted) pairs, on the module's device.

    Args:
        num_classes: The class count; None takes it from the predictions when they are logits
            (one column per class).
    """

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes
        self._metric: MulticlassConfusionMatrix | None = None

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> bool:
        """Count a batch; False when the class count cannot be known (labels, no count given)."""
        preds = preds.detach()
        if preds.is_floating_point() and preds.ndim == 2:
            count = self.num_classes or preds.shape[1]
            preds = preds.argmax(dim=1)
        else:
            count = self.num_classes
        if count is None:
            return False
        if self._metric is None:
            # No input checks: they count each batch's distinct labels, which on a GPU waits
            # for the batch to finish. Out-of-range labels fail in the module's own loss first.
            metric = MulticlassConfusionMatrix(num_classes=count, validate_args=False)
            self._metric = metric.to(preds.device)
        self._metric.update(preds, target.detach())
        return True

    @property
    def updated(self) -> bool:
        return self._metric is not None and bool(self._metric.update_count)

    def compute(self) -> np.ndarray:
        """Rows are true classes, columns predicted ones. Under DDP every rank must call it: it
        gathers the counts of all processes."""
        assert self._metric is not None
        return self._metric.compute().cpu().numpy()

    def reset(self) -> None:
        if self._metric is not None:
            self._metric.reset()

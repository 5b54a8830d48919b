"""The end-of-run evaluation on the test split, and its artifacts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch.utils.data import DataLoader

from dlharness.models.classifier import ClassifierModule, classification_metrics
from dlharness.tracking.pictures import charts
from dlharness.tracking.pictures.step_images import log_png

EVALUATED_EPOCH_TAG = "dlharness.evaluated_epoch"
# Misclassified test images shown in evaluation/misclassified.png.
MISCLASSIFIED_SHOWN = 32


@dataclass
class Evaluation:
    metrics: dict[str, float]
    probabilities: np.ndarray  # (N, classes)
    targets: np.ndarray  # (N,)
    misclassified: np.ndarray  # (M, C, H, W) inputs, at most MISCLASSIFIED_SHOWN
    misclassified_index: np.ndarray  # (M,) positions in the split

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


@torch.no_grad()
def evaluate(
    module: ClassifierModule, loader: DataLoader, device: torch.device, stage: str = "test"
) -> Evaluation:
    """Loss and the training metrics (same definitions) on every sample of `loader`, in order,
    named ``{stage}/{metric}``."""
    module = module.to(device).eval()
    # Evaluated by this process alone: after DDP the other ranks are gone, and syncing with
    # them would wait forever.
    num_classes = module.hparams.net_spec["num_classes"]
    metrics = classification_metrics(num_classes, sync_on_compute=False).to(device)
    probabilities, targets, bad_inputs, bad_index = [], [], [], []
    loss_sum, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = module(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs = logits.softmax(dim=-1)
        metrics.update(probs, y)
        wrong = (probs.argmax(dim=-1) != y).nonzero().flatten()
        room = MISCLASSIFIED_SHOWN - sum(len(b) for b in bad_inputs)
        if room > 0 and len(wrong):
            bad_inputs.append(x[wrong[:room]].cpu())
            bad_index.append((wrong[:room] + seen).cpu())
        probabilities.append(probs.cpu())
        targets.append(y.cpu())
        seen += len(y)
    values = {f"{stage}/{key}": float(value) for key, value in metrics.compute().items()}
    values[f"{stage}/loss"] = loss_sum / seen
    image_shape = (0, *next(iter(loader))[0].shape[1:])
    return Evaluation(
        metrics=values,
        probabilities=torch.cat(probabilities).numpy(),
        targets=torch.cat(targets).numpy(),
        misclassified=torch.cat(bad_inputs).numpy() if bad_inputs else np.zeros(image_shape),
        misclassified_index=torch.cat(bad_index).numpy() if bad_index else np.zeros(0, dtype=int),
    )


def per_class_table(evaluation: Evaluation, class_names: Sequence[str]) -> pd.DataFrame:
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        evaluation.targets, evaluation.predictions, labels=labels, zero_division=0
    )
    return pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )


def predictions_table(evaluation: Evaluation, class_names: Sequence[str]) -> pd.DataFrame:
    predicted = evaluation.predictions
    table = pd.DataFrame(
        {
            "index": np.arange(len(predicted)),
            "target": [class_names[t] for t in evaluation.targets],
            "predicted": [class_names[p] for p in predicted],
            "confidence": evaluation.probabilities.max(axis=1),
            "correct": predicted == evaluation.targets,
        }
    )
    for i, name in enumerate(class_names):
        table[f"p_{name}"] = evaluation.probabilities[:, i]
    return table


def roc_curve(positives: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(false positive rates, true positive rates, AUC) of `scores` for the boolean
    `positives`, one point per distinct score from the highest: scikit-learn's `roc_curve`
    without dropping collinear points, and its `roc_auc_score` (the trapezoids under it),
    without their argument checks, which cost fifty times the computation."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], positives[order]
    # The last index of each run of equal scores: a threshold admits all of them at once.
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_pos = np.cumsum(hits)[ends]
    false_pos = ends + 1 - true_pos
    tpr = np.r_[0.0, true_pos / true_pos[-1]]
    fpr = np.r_[0.0, false_pos / false_pos[-1]]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def roc_curves(evaluation: Evaluation, class_names: Sequence[str]) -> dict[str, tuple]:
    """One-vs-rest ROC per class that occurs in the split (a curve needs both outcomes)."""
    curves = {}
    for i, name in enumerate(class_names):
        positives = evaluation.targets == i
        if positives.all() or not positives.any():
            continue
        curves[name] = roc_curve(positives, evaluation.probabilities[:, i])
    return curves


def log_evaluation(
    client: MlflowClient,
    run_id: str,
    evaluation: Evaluation,
    class_names: Sequence[str],
    epoch: int,
) -> None:
    """Test metrics at ``step = epoch`` (the epoch whose weights were evaluated), with the tag
    `dlharness.evaluated_epoch` in the same write, and artifacts."""
    now_ms = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now_ms, epoch) for k, v in sorted(evaluation.metrics.items())],
        tags=[RunTag(EVALUATED_EPOCH_TAG, str(epoch))],
    )
    matrix = confusion_matrix(
        evaluation.targets, evaluation.predictions, labels=list(range(len(class_names)))
    )
    client.log_dict(
        run_id,
        {
            "labels": list(class_names),
            "rows": "true",
            "columns": "predicted",
            "matrix": matrix.tolist(),
        },
        "evaluation/confusion_matrix.json",
    )
    log_png(
        client,
        run_id,
        charts.confusion_chart(matrix, class_names, f"Test confusion matrix (epoch {epoch})"),
        "evaluation/confusion_matrix.png",
    )
    log_png(
        client,
        run_id,
        charts.roc_chart(roc_curves(evaluation, class_names)),
        "evaluation/roc_curves.png",
    )
    client.log_table(
        run_id, per_class_table(evaluation, class_names), "evaluation/per_class_metrics.json"
    )
    client.log_table(
        run_id, predictions_table(evaluation, class_names), "evaluation/predictions.json"
    )
    predicted = evaluation.predictions
    captions = [
        f"#{i}: {class_names[evaluation.targets[i]]}->{class_names[predicted[i]]}"
        for i in evaluation.misclassified_index
    ]
    log_png(
        client,
        run_id,
        charts.image_grid(
            evaluation.misclassified, captions, "Misclassified test images (true->predicted)"
        ),
        "evaluation/misclassified.png",
    )

"""dlharness: a PyTorch Lightning training harness whose every epoch is tracked in MLflow.

The library: `MlflowTracking`, one callback that tracks any Lightning fit in MLflow, and
`checkpoint_path`, a run's stored checkpoint as a verified local file to resume from. The
harness built on them: `train(load_config(...))`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use: torch, Lightning and MLflow take seconds to import, and the CLIs'
# --help and config errors answer without them.
_EXPORTS = {
    "MlflowTracking": "dlharness.callbacks.mlflow_tracking",
    "checkpoint_path": "dlharness.tracking.checkpointing.artifacts",
    "CheckpointError": "dlharness.tracking.checkpointing.artifacts",
    "TrackingWarning": "dlharness.tracking.worker",
    "TrainingInterrupted": "dlharness.tracking.interruption",
    "train": "dlharness.training.train",
    "TrainResult": "dlharness.training.train",
    "load_config": "dlharness.training.config",
    "TrainConfig": "dlharness.training.config",
}
__all__ = [
    "CheckpointError",
    "MlflowTracking",
    "TrackingWarning",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "__version__",
    "checkpoint_path",
    "load_config",
    "train",
]

if TYPE_CHECKING:
    from dlharness.callbacks.mlflow_tracking import MlflowTracking
    from dlharness.tracking.checkpointing.artifacts import CheckpointError, checkpoint_path
    from dlharness.tracking.interruption import TrainingInterrupted
    from dlharness.tracking.worker import TrackingWarning
    from dlharness.training.config import TrainConfig, load_config
    from dlharness.training.train import TrainResult, train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlharness' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

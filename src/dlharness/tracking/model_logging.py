"""Logging a trained network as an MLflow model that loads anywhere the pinned packages exist."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import mlflow
import torch
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from torch import nn

import dlharness


def pinned_requirements() -> list[str]:
    """Exact versions of what unpickling the network needs.

    Given explicitly because MLflow's requirement inference re-imports the model in a
    subprocess, which costs seconds per run.
    """
    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "numpy")]


def log_network(net: nn.Module, example_batch: torch.Tensor, name: str = "model") -> ModelInfo:
    """Log `net` (pytorch flavor, pickled) with a signature and an input example.

    The network's own classes ship with the model (`code_paths`), so loading it needs only
    the pinned packages, not an installed dlharness.
    """
    cpu_net = copy.deepcopy(net).to("cpu").float().eval()
    example = example_batch[:4].detach().to("cpu", torch.float32)
    with torch.no_grad():
        outputs = cpu_net(example)
    # MLflow warns that pickled models run code when loaded; that is the pytorch flavor's
    # trade-off for returning a real nn.Module, and the README's security notes say so.
    with _quiet("mlflow.pytorch"):
        return mlflow.pytorch.log_model(
            cpu_net,
            name=name,
            signature=infer_signature(example.numpy(), outputs.numpy()),
            input_example=example.numpy(),
            pip_requirements=pinned_requirements(),
            code_paths=[str(Path(dlharness.__file__).parent)],
            serialization_format="pickle",
        )


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)

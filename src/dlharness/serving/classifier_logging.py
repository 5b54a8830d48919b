"""Logging a trained network as the served image classifier (`classifier_model.py`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models.model import ModelInfo
from torch import nn

# The model's code. Not imported here: it registers its model with MLflow when run.
MODEL_CODE = Path(__file__).with_name("classifier_model.py")
# What loading the classifier imports (classifier_model.py and the network's code).
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pydantic")


@dataclass(frozen=True)
class ImagePreprocessing:
    """What training did to a uint8 image before the network saw it.

    Args:
        channels: 1 (greyscale) or 3 (RGB).
        image_size: Square side in pixels.
        mean: Per channel, of pixel values scaled to 0–1.
        std: Per channel, likewise.
    """

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need {self.channels} value(s) each")

    def raw_images(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Normalised (N, C, H, W) tensors back to uint8 images, H×W or H×W×3."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        pixels = (batch.detach().cpu().float() * std + mean).mul(255).round().clamp(0, 255)
        images = pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [image[:, :, 0] if self.channels == 1 else image for image in images]


def pinned(*packages: str) -> list[str]:
    """Exact installed versions, as pip requirements.

    Given explicitly because MLflow's requirement inference re-imports the model in a
    subprocess, which costs seconds per run.
    """
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


@contextlib.contextmanager
def quiet_any_type_hint() -> Iterator[None]:
    """No warning that the classifier's `list[Any]` input is not validated by MLflow.

    The items are pixel arrays or strings, which MLflow's schema cannot say as one type;
    the model checks each one. MLflow forces that warning's filter to "once", so it is caught
    as a record and dropped; other warnings are shown. (classifier_model.py does the same for
    its class definition: it cannot import this.)
    """
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if "Any type hint is inferred as AnyType" not in str(warning.message):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


@contextlib.contextmanager
def _no_download_bars() -> Iterator[None]:
    # Logging loads the model once to check the input example: three progress bars for
    # files already on this disk, unless the user asked for them.
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def log_classifier(
    net: nn.Module,
    net_spec: dict[str, Any],
    network_code: Path,
    class_names: Sequence[str],
    preprocessing: ImagePreprocessing,
    example_images: Sequence[np.ndarray],
    name: str = "classifier",
) -> ModelInfo:
    """Log `net` into the active run as a pyfunc model that takes raw images.

    Args:
        net: The trained network; its weights are saved from a float32 CPU copy.
        net_spec: What `build_net(net_spec)` in `network_code` rebuilds `net` from.
        network_code: A Python file defining `build_net(spec) -> nn.Module`, importing no
            dlharness; it ships with the model.
        class_names: By class index.
        preprocessing: The training images' channels, size and normalisation.
        example_images: A few raw images, the model's input example.
        name: The model's name in the run.
    """
    if len(class_names) == 0:
        raise ValueError("class_names is empty")
    spec = {"net": net_spec, "class_names": list(class_names), **asdict(preprocessing)}
    # Float tensors as contiguous float32 on the CPU (whatever the training's precision and
    # layout); integer buffers such as BatchNorm's batch count keep their type.
    weights = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    with tempfile.TemporaryDirectory(prefix="dlharness-classifier-") as scratch:
        folder = Path(scratch)
        (folder / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(weights, folder / "weights.pt")
        # The keys classifier_model.py reads its artifacts by.
        artifacts = {
            "spec": str(folder / "spec.json"),
            "weights": str(folder / "weights.pt"),
            "network_code": str(network_code),
        }
        with quiet_any_type_hint(), _no_download_bars():
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                input_example=[image.tolist() for image in example_images[:2]],
                pip_requirements=pinned(*REQUIREMENTS),
            )

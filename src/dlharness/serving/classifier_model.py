"""The served image classifier: raw images in, class names and probabilities out.

MLflow logs this file as the model's code ("models from code") and runs it when it loads the
model, so it imports nothing from dlharness: the network's code, its weights and the
preprocessing the training data went through come from the model's own artifacts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.util
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

# The model's artifacts, by the keys `dlharness.serving.classifier_logging` logs them under.
SPEC, WEIGHTS, NETWORK_CODE = "spec", "weights", "network_code"
# Images per forward pass: bounds the memory a large request takes.
CHUNK = 256
# Larger sides are refused: a 4096² RGB image is 48 MB as float32 before resizing.
MAX_SIDE = 4096
# PIL's image mode for the network's number of input channels.
_MODES = {1: "L", 3: "RGB"}
# Channels a pixel array may have: greyscale, RGB, RGBA.
_ARRAY_CHANNELS = (1, 3, 4)


class Prediction(pydantic.BaseModel):
    """One image's answer."""

    class_name: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: the scoring server answers 400 and keeps serving.
    return MlflowException.invalid_parameter_value(message)


def _from_base64(item: str, index: int) -> Image.Image:
    # A data URL ("data:image/png;base64,...") is what a browser's FileReader gives.
    payload = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise _bad_input(f"image {index}: not a base64-encoded PNG or JPEG file") from None
    return image


def _from_pixels(item: Any, index: int) -> Image.Image:
    try:
        pixels = np.asarray(item)
    except ValueError:  # nested lists of unequal lengths
        raise _bad_input(f"image {index}: rows of unequal length") from None
    shape = "×".join(map(str, pixels.shape))
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2] if pixels.ndim == 3 else 0
    if channels not in _ARRAY_CHANNELS:
        raise _bad_input(
            f"image {index}: pixel array of shape {shape}; "
            "expected H×W (greyscale), H×W×3 (RGB) or H×W×4 (RGBA)"
        )
    if pixels.size == 0:
        raise _bad_input(f"image {index}: no pixels ({shape})")
    if not np.issubdtype(pixels.dtype, np.integer) or pixels.min() < 0 or pixels.max() > 255:
        raise _bad_input(f"image {index}: pixel values must be integers 0–255")
    return Image.fromarray(pixels.astype(np.uint8))  # L, RGB or RGBA by shape


def _as_image(item: Any, index: int) -> Image.Image:
    if isinstance(item, str):
        image = _from_base64(item, index)
    elif isinstance(item, list | np.ndarray):
        image = _from_pixels(item, index)
    else:
        raise _bad_input(
            f"image {index}: a {type(item).__name__}; "
            "send a pixel array or a base64 PNG/JPEG string"
        )
    if max(image.size) > MAX_SIDE:
        raise _bad_input(
            f"image {index}: {image.width}×{image.height} pixels; at most {MAX_SIDE} a side"
        )
    return image


def _import_file(path: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _no_any_hint_warning() -> Iterator[None]:
    """Drop MLflow's warning that it cannot validate a `list[Any]` input, keep the others.

    The items are pixel arrays or strings, which MLflow's schema cannot say as one type;
    `predict` checks each one. MLflow forces that warning's filter to "once", so it is caught
    as a record rather than filtered.
    """
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if "Any type hint is inferred as AnyType" not in str(warning.message):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


# MLflow reads the input type hint when the class is defined.
with _no_any_hint_warning():

    class ImageClassifier(PythonModel):
        """Each input item is one image: a uint8 pixel array (H×W greyscale, H×W×3 RGB, any size,
        or its nested lists in JSON), or a base64-encoded PNG/JPEG file. It is converted to the
        training images' channels and size and normalised as they were."""

        def load_context(self, context) -> None:
            spec = json.loads(Path(context.artifacts[SPEC]).read_text())
            nets = _import_file(context.artifacts[NETWORK_CODE], "classifier_network")
            self.net = nets.build_net(spec["net"])
            self.net.load_state_dict(torch.load(context.artifacts[WEIGHTS], weights_only=True))
            self.net.eval()
            self.class_names = spec["class_names"]
            self.mode = _MODES[spec["channels"]]
            self.size = spec["image_size"]
            # The steps of the training transform (dlharness.data.base.image_transform), after
            # the image has the training channels: resized only when its size differs.
            self.resize = v2.Resize((self.size, self.size), antialias=True)
            self.scale = v2.Compose(
                [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])]
            )

        def _tensor(self, image: Image.Image) -> torch.Tensor:
            pixels = v2.functional.pil_to_tensor(image.convert(self.mode))
            if tuple(pixels.shape[1:]) != (self.size, self.size):
                pixels = self.resize(pixels)
            return self.scale(pixels)

        def predict(
            self, model_input: list[Any], params: dict[str, Any] | None = None
        ) -> list[Prediction]:
            if len(model_input) == 0:
                raise _bad_input("empty batch: send at least one image")
            images = [_as_image(item, index) for index, item in enumerate(model_input)]
            batch = torch.stack([self._tensor(image) for image in images])
            with torch.inference_mode():
                probabilities = torch.cat(
                    [self.net(chunk).softmax(dim=1) for chunk in batch.split(CHUNK)]
                ).double()
            answers = []
            for row in probabilities.tolist():
                index = int(np.argmax(row))
                answers.append(
                    Prediction(
                        class_name=self.class_names[index],
                        class_index=index,
                        confidence=row[index],
                        probabilities=dict(zip(self.class_names, row, strict=True)),
                    )
                )
            return answers


set_model(ImageClassifier())

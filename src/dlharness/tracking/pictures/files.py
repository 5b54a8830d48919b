"""The tracked pictures as files, drawn and encoded with PIL alone (no MLflow, no torch), so
that the helper process in `picture_process` can make them as well as the tracking thread."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dlharness.tracking.pictures import charts

# The longest side of MLflow's `log_image` preview, in pixels (mlflow.tracking.multimedia).
PREVIEW_SIDE = 256
# File names of the curves, under the run's `plots/` folder.
LOSS_CURVES_FILE = "loss_curves.png"
METRIC_CURVES_FILE = "metric_curves.png"


def _preview(image: Image.Image) -> Image.Image:
    width, height = image.size
    scale = PREVIEW_SIDE / max(width, height)
    # Box (area averaging): a third of bicubic's time, as sharp for a reduction.
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def write_step_image(image: Image.Image, png: Path, webp: Path) -> None:
    """The two files of MLflow's `log_image` with the fastest settings: PNG at zlib level 1,
    lossless WebP at method 0 (less than half the time of PIL's defaults)."""
    image.save(png, format="PNG", compress_level=1)
    _preview(image).save(webp, format="WEBP", lossless=True, method=0)


def write_confusion(
    matrix: np.ndarray, class_names: Sequence[str], title: str, png: Path, webp: Path
) -> None:
    write_step_image(charts.confusion_chart(matrix, class_names, title), png, webp)


def write_curves(history: charts.History, folder: Path) -> None:
    """The loss curves and the validation metrics' curves, drawn from the whole history."""
    for chart, name in (
        (charts.loss_chart(history), LOSS_CURVES_FILE),
        (charts.metric_chart(history), METRIC_CURVES_FILE),
    ):
        # Fastest zlib level: the files are about 3 times larger and written twice as fast.
        chart.save(folder / name, format="PNG", compress_level=1)

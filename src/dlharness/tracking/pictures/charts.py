"""Pictures drawn with PIL in a few milliseconds: curves, confusion matrices, ROC, image grids.

matplotlib takes tens of times as long per figure and competes with training for the cores
whichever thread or process draws it (it doubled the digits epoch), and at the end of a run its
ROC figure was a fifth of the end-of-run budget (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

History = Mapping[int, Mapping[str, float]]
# matplotlib's "tab10" colours, so curves look as they do in the MLflow UI's own charts.
PALETTE = (
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"),
    *("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
)
# Width and height of a curve chart, and its margins (left, top, right, bottom), in pixels.
SIZE = (640, 400)
MARGINS = (70, 40, 20, 50)
# A confusion chart's room for the row labels (left) and the title (top), in pixels.
CONFUSION_LABEL_W, CONFUSION_TOP = 90, 50


@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
    # Parsing the bundled font each time would cost more than drawing; a chart asks for a few
    # sizes often.
    return ImageFont.load_default(size=size)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


Series = Mapping[str, Sequence[tuple[float, float]]]


def line_chart(
    series: Series,
    title: str,
    x_label: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    x_ticks: Sequence[float],
    y_label: str = "",
    markers: bool = True,
    legend_below: bool = False,
    diagonal: bool = False,
) -> Image.Image:
    """One line per named series of (x, y) points, with a legend; non-finite points skipped."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGINS[0], MARGINS[1], SIZE[0] - MARGINS[2], SIZE[1] - MARGINS[3]
    (x_low, x_high), (y_low, y_high) = x_range, y_range

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * (x - x_low) / (x_high - x_low),
            bottom - (bottom - top) * (y - y_low) / (y_high - y_low),
        )

    small, normal = _font(12), _font(15)
    draw.text(((left + right) / 2, 12), title, fill="black", font=normal, anchor="mt")
    if y_label:
        draw.text((left, top - 4), y_label, fill="black", font=small, anchor="lb")
    for tick in _ticks(y_low, y_high):
        _, y = to_xy(x_low, tick)
        draw.line([(left, y), (right, y)], fill="#e5e5e5")
        draw.text((left - 6, y), f"{tick:.3g}", fill="black", font=small, anchor="rm")
    for tick in x_ticks:
        x, _ = to_xy(tick, y_low)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, SIZE[1] - 8), x_label, fill="black", font=small, anchor="mb")
    if diagonal:  # dashed, from the lower left corner to the upper right, in 50 dashes
        for i in range(0, 100, 2):
            draw.line(
                [
                    (left + (right - left) * f, bottom - (bottom - top) * f)
                    for f in (i / 100, (i + 1) / 100)
                ],
                fill="grey",
            )
    for index, (name, points) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        xy = [to_xy(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if markers:
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if legend_below:  # stacked up from the lower right corner, the last entry lowest
            legend_y = bottom - 10 - 18 * (len(series) - 1 - index)
        else:
            legend_y = top + 10 + 18 * index
        draw.line([(right - 170, legend_y), (right - 145, legend_y)], fill=color, width=3)
        draw.text((right - 138, legend_y), name, fill="black", font=small, anchor="lm")
    return image


def curve_chart(history: History, keys: Sequence[str], title: str) -> Image.Image:
    """One line per metric key against the epoch (0-based, as logged)."""
    series = {
        key: [(epoch, values[key]) for epoch, values in sorted(history.items()) if key in values]
        for key in keys
    }
    series = {key: points for key, points in series.items() if points}
    values = [v for points in series.values() for _, v in points if math.isfinite(v)]
    epochs = [e for points in series.values() for e, _ in points]
    y_low, y_high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (y_high - y_low) * 0.05 or 0.5
    x_high = max(max(epochs, default=1), 1)
    step = max(1, math.ceil((x_high + 1) / 10))
    return line_chart(
        series,
        title,
        "epoch",
        (0, x_high),
        (y_low - pad, y_high + pad),
        range(0, x_high + 1, step),
    )


def roc_chart(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]]) -> Image.Image:
    """One-vs-rest ROC curves: class name → (false positive rates, true positive rates, AUC)."""
    series = {
        f"{name} (AUC {auc:.3f})": list(zip(fpr.tolist(), tpr.tolist(), strict=True))
        for name, (fpr, tpr, auc) in curves.items()
    }
    return line_chart(
        series,
        "One-vs-rest ROC on the test split",
        "false positive rate",
        (0.0, 1.0),
        (0.0, 1.0),
        (0.0, 0.25, 0.5, 0.75, 1.0),
        y_label="true positive rate",
        markers=False,
        legend_below=True,
        diagonal=True,
    )


def _keys(history: History) -> list[str]:
    return sorted({key for values in history.values() for key in values})


def loss_chart(history: History) -> Image.Image:
    """Every metric with "loss" in its name (`train/loss`, `val_loss`, ...), by epoch."""
    keys = [key for key in _keys(history) if "loss" in key.lower()]
    return curve_chart(history, keys[: len(PALETTE)], "Loss by epoch")


def metric_chart(history: History) -> Image.Image:
    """Every validation metric but the losses (`val/acc`, `val_f1`, ...), by epoch."""
    keys = [
        key for key in _keys(history) if key.lower().startswith("val") and "loss" not in key.lower()
    ]
    return curve_chart(history, keys[: len(PALETTE)], "Validation metrics by epoch")


# matplotlib's darkest "Blues": a count at the matrix's peak; zero is white.
DARK_BLUE = np.array([8, 48, 107])


def _blues(fractions: np.ndarray) -> np.ndarray:
    """White (0) to `DARK_BLUE` (1), as uint8 RGB, for an array of fractions."""
    return np.round(255 + (DARK_BLUE - 255) * fractions[..., None]).astype(np.uint8)


def _cell_font(cell: int) -> ImageFont.ImageFont:
    # Counts and labels scale with a cell of `cell` px, between 8 and 12 px.
    return _font(max(8, min(12, cell // 3)))


@functools.lru_cache(maxsize=4)
def _confusion_frame(class_names: tuple[str, ...], cell: int) -> Image.Image:
    """Everything of a confusion chart but its title and cells: drawn once per run."""
    n = len(class_names)
    width, height = CONFUSION_LABEL_W + cell * n + 20, CONFUSION_TOP + cell * n + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, top, left = _cell_font(cell), CONFUSION_TOP, CONFUSION_LABEL_W
    for i, name in enumerate(class_names):
        label = name[:12]
        draw.text(
            (left - 6, top + i * cell + cell / 2), label, fill="black", font=small, anchor="rm"
        )
        draw.text(
            (left + i * cell + cell / 2, top + n * cell + 4),
            label[:4],
            fill="black",
            font=small,
            anchor="mt",
        )
    draw.text(
        (left + n * cell / 2, height - 10), "predicted", fill="black", font=small, anchor="mb"
    )
    draw.text((8, top - 14), "true", fill="black", font=small, anchor="lm")
    return image


@functools.lru_cache(maxsize=512)
def _count_mask(text: str, size: int) -> Image.Image:
    # A count's glyphs, rendered once: most cells of a confusion matrix repeat a few numbers.
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).text(
        (size / 2, size / 2), text, fill=255, font=_cell_font(size), anchor="mm"
    )
    return mask


def confusion_chart(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Image.Image:
    """Counts, rows = true class, columns = predicted class."""
    n = len(class_names)
    # 280 px of cells at most: 28 px for 10 classes, a picture encoded twice per epoch.
    cell = int(np.clip(280 // max(n, 1), 14, 48))
    image = _confusion_frame(tuple(class_names), cell).copy()
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, 12), title, fill="black", font=_font(15), anchor="mt")
    counts = np.asarray(matrix).astype(np.int64)
    fractions = counts / max(int(counts.max()), 1)
    # The cells as one array: each `cell` px square, a 1 px white line at its top and left.
    cells = np.repeat(np.repeat(_blues(fractions), cell, axis=0), cell, axis=1)
    cells[::cell, :], cells[:, ::cell] = 255, 255
    image.paste(Image.fromarray(cells), (CONFUSION_LABEL_W, CONFUSION_TOP))
    for (row, col), count in np.ndenumerate(counts):
        x, y = CONFUSION_LABEL_W + col * cell, CONFUSION_TOP + row * cell
        color = "white" if fractions[row, col] > 0.5 else "black"
        image.paste(color, (x, y), _count_mask(str(int(count)), cell))
    return image


def image_grid(images: np.ndarray, captions: Sequence[str], title: str) -> Image.Image:
    """Images (N, C, H, W), each min-max scaled, enlarged to about 64 px, with a caption each."""
    cols = max(1, min(8, len(images)))
    rows = max(1, -(-len(images) // cols))
    side = 64
    cap_h, top = 16, 32
    width = max(cols * (side + 8) + 8, 8 * len(title))
    grid = Image.new("RGB", (width, top + rows * (side + cap_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((grid.width / 2, 10), title, fill="black", font=_font(14), anchor="mt")
    small = _font(10)
    for i, (array, caption) in enumerate(zip(images, captions, strict=True)):
        pixels = array.transpose(1, 2, 0).astype(np.float32)
        span = float(pixels.max() - pixels.min())
        pixels = (pixels - pixels.min()) / span if span > 0 else np.zeros_like(pixels)
        pixels = (pixels * 255).round().astype(np.uint8)
        tile = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        scale = max(1, side // max(tile.size))
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        x = 8 + (i % cols) * (side + 8)
        y = top + (i // cols) * (side + cap_h + 8)
        grid.paste(tile.convert("RGB"), (x, y))
        draw.text((x + side / 2, y + side + 2), caption[:14], fill="black", font=small, anchor="mt")
    return grid

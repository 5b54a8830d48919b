"""`dlharness-predict`: classify image files with a served-ready model, in this process or
through a running `dlharness-serve`, into a CSV."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests
from PIL import Image, UnidentifiedImageError

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.tracking.store_access import existing_store

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Images per request or predict call: a 32×32 PNG is ≈2 KB of base64, so ≈0.5 MB a request.
BATCH = 256
REQUEST_TIMEOUT_S = 120
# The server failed on its side (5xx): not the user's input.
EXIT_SERVER_ERROR = 1


class ServerError(Exception):
    """The model server answered with a 5xx."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-predict",
        description="Classify image files with a served-ready model (the 'classifier' a "
        "training logs) and write one CSV row per image.",
    )
    parser.add_argument(
        "model_uri",
        help="runs:/RUN_ID/classifier, models:/NAME/VERSION or models:/NAME@ALIAS "
        "(with --server, the server's own model answers)",
    )
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--server", default=None, help="a running dlharness-serve, e.g. "
                        "http://127.0.0.1:5001")  # fmt: skip
    parser.add_argument("--out", default=None, help="CSV file (default: standard output)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="where the model is stored (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def image_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and the image files under the folders named, in a stable order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UsageError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return found


def encoded(path: Path) -> str:
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError):
        raise UsageError(f"{path}: not an image file") from None
    return base64.b64encode(data).decode("ascii")


def _batches(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def server_reason(response: requests.Response) -> str:
    """The scoring server's own reason, on one line (its message quotes the input first)."""
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.text
    reason = message.rsplit("Error: ", 1)[-1].strip().splitlines()
    return reason[0] if reason else f"HTTP {response.status_code}"


def predict_on_server(url: str, images: list[str]) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    for batch in _batches(images):
        try:
            response = requests.post(
                f"{url.rstrip('/')}/invocations", json={"inputs": batch}, timeout=REQUEST_TIMEOUT_S
            )
        except requests.RequestException as exc:
            raise UsageError(f"no model server answers at {url} ({type(exc).__name__})") from None
        if 400 <= response.status_code < 500:
            raise UsageError(f"the server refused the images: {server_reason(response)}")
        if response.status_code != 200:
            raise ServerError(f"the server failed (HTTP {response.status_code}): "
                              f"{server_reason(response)}")  # fmt: skip
        answers += response.json()["predictions"]
    return answers


def predict_here(model_uri: str, images: list[str]) -> list[dict[str, Any]]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from dlharness.serving.classifier_logging import quiet_any_type_hint

    try:
        with quiet_any_type_hint():
            model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise UsageError(f"model {model_uri}: {str(exc).strip().splitlines()[0]}") from None
    answers: list[dict[str, Any]] = []
    for batch in _batches(images):
        try:
            with quiet_any_type_hint():
                predictions = model.predict(batch)
        except MlflowException as exc:
            raise UsageError(f"model {model_uri}: {str(exc).splitlines()[0]}") from None
        answers += [p.model_dump() if hasattr(p, "model_dump") else p for p in predictions]
    return answers


def write_csv(files: Sequence[Path], answers: Sequence[dict[str, Any]], out: io.TextIOBase):
    classes = list(answers[0]["probabilities"])
    writer = csv.writer(out)
    writer.writerow(["file", "class", "confidence", *(f"p_{name}" for name in classes)])
    for path, answer in zip(files, answers, strict=True):
        probabilities = [f"{answer['probabilities'][name]:.6g}" for name in classes]
        writer.writerow([path, answer["class_name"], f"{answer['confidence']:.6g}", *probabilities])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        files = image_files(args.paths)
        images = [encoded(path) for path in files]
        if args.server:
            answers = predict_on_server(args.server, images)
        else:
            import mlflow

            mlflow.set_tracking_uri(existing_store(args.tracking_uri))
            answers = predict_here(args.model_uri, images)
    except UsageError as exc:
        print(f"dlharness-predict: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServerError as exc:
        print(f"dlharness-predict: error: {exc}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    if args.out:
        with open(args.out, "w", newline="") as out:
            write_csv(files, answers, out)
        print(f"{len(answers)} predictions written to {args.out}", file=sys.stderr)
    else:
        write_csv(files, answers, sys.stdout)
    return 0

"""`dlharness-serve`: MLflow's own scoring server for a logged or registered model, on
loopback.

It checks the model URI first (one line, exit 2, if the store does not know it), then
replaces itself with `mlflow models serve --env-manager local`: this environment's packages
serve the model, and a signal to this process reaches the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError, first_line
from dlharness.tracking.store_access import existing_store

# The model server binds loopback only, as the tracking server does by default.
HOST = "127.0.0.1"

DEFAULT_PORT = 5001


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-serve",
        description="Serve a model over REST (POST /invocations) on 127.0.0.1.",
    )
    parser.add_argument(
        "model_uri", help="runs:/RUN_ID/classifier, models:/NAME/VERSION or models:/NAME@ALIAS"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="where the model is stored (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def check_model(model_uri: str) -> None:
    """Fail with one line when the store cannot resolve `model_uri`."""
    try:
        mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise UsageError(f"model {model_uri}: {first_line(exc)}") from None


def serve_command(model_uri: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve",
        "--model-uri", model_uri,
        "--env-manager", "local",
        "--host", HOST,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def serve_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    # MLflow starts the server as `uvicorn …` by name: it must be this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if not 0 < args.port < 65536:
            raise UsageError(f"--port must be 1–65535, got {args.port}")
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {args.workers}")
        tracking_uri = existing_store(args.tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        check_model(args.model_uri)
    except UsageError as exc:
        print(f"dlharness-serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"serving {args.model_uri} at http://{HOST}:{args.port}/invocations",
        flush=True,
    )
    command = serve_command(args.model_uri, args.port, args.workers)
    os.execve(command[0], command, serve_env(tracking_uri))

"""One file written for the run and logged at a chosen artifact path, as MLflow's own
`log_image(artifact_file=...)` and `log_table` do, with an encoder of the caller's choice."""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient


def log_written_file(
    client: MlflowClient, run_id: str, artifact_file: str, write: Callable[[Path], None]
) -> None:
    """``write(path)`` in a temporary folder, then log that file as `artifact_file`
    (``folder/name``; a bare name logs at the run's root)."""
    with tempfile.TemporaryDirectory(prefix="dlharness-artifact-") as scratch:
        path = Path(scratch) / posixpath.basename(artifact_file)
        write(path)
        client.log_artifact(run_id, str(path), posixpath.dirname(artifact_file) or None)

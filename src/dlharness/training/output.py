"""What the commands that train (train, sweep, reproduce) print besides their own lines."""

from __future__ import annotations

import logging
import os


def plain_training_output() -> None:
    """What the commands that train print, set up once per process."""
    # Lightning's and MLflow's progress notes as plain lines (MLflow's autolog module would
    # otherwise install a root handler that prefixes them with INFO:logger.name:).
    logging.basicConfig(format="%(message)s")
    # Creating the tables of a fresh SQLite store is routine, not news; nor is each download
    # of a checkpoint, which MLflow would draw a progress bar for.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

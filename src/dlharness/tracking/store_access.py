"""Which tracking store a command uses, and whether it can be used: checked before anything
is trained, refusals of a team server's credentials or permissions in one line."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import requests
from filelock import FileLock

from dlharness.errors import UsageError, first_line

# Where runs go when nothing names a store: MLflow's own default since 3.7.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# A tracking server that does not answer /health within this many seconds counts as down.
HEALTH_TIMEOUT_S = 5
# Seconds to wait for another process that is creating a fresh SQLite store's tables (it takes
# about a second).
STORE_LOCK_TIMEOUT_S = 120


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        db_path = uri.removeprefix("sqlite:///")
        parent = Path(db_path).parent if db_path and db_path != ":memory:" else Path()
        if not parent.is_dir():
            raise UsageError(
                f"tracking URI {uri}: folder {parent} does not exist; "
                "create it or pass another --tracking-uri"
            )
        if not os.access(parent, os.W_OK):
            raise UsageError(f"tracking URI {uri}: folder {parent} is not writable")
    elif scheme in ("http", "https"):
        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S)
        except requests.RequestException as exc:
            raise UsageError(
                f"cannot reach the MLflow tracking server at {uri} ({type(exc).__name__}); "
                "start it or pass another --tracking-uri"
            ) from None
        if response.status_code != 200:
            raise UsageError(
                f"MLflow tracking server at {uri} answered /health with HTTP {response.status_code}"
            )
    try:
        open_store(uri)
    except Exception as exc:
        refusal = server_refusal(exc, uri, "reading experiments")
        raise UsageError(
            refusal or f"tracking URI {uri} is not usable: {first_line(exc)}"
        ) from None


def server_refusal(exc: BaseException, uri: str, doing: str) -> str | None:
    """One line for a tracking server that refused the credentials (HTTP 401) or the user's
    permission for `doing` (403); None for any other failure."""
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
    if status == 401:
        given = "MLFLOW_TRACKING_USERNAME" in os.environ
        return (
            f"the tracking server at {uri} refused the "
            f"{'user and password' if given else 'request: it asks for a user and password'}; "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"
        )
    if status == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        return (
            f"the tracking server at {uri} does not permit {user} {doing}: that needs the EDIT "
            "permission on the experiment (READ only reads it); ask the server's admin"
        )
    return None


def existing_store(flag: str | None) -> str:
    """The store a command that reads it uses: `flag`, else $MLFLOW_TRACKING_URI, else the
    training default; a SQLite file must already exist (MLflow would create an empty one)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(
            f"no tracking store at {uri.removeprefix('sqlite:///')}; "
            "train first, or pass --tracking-uri"
        )
    return uri


def open_store(uri: str) -> None:
    """Open the store once, creating or upgrading a SQLite store's tables under a file lock.

    Processes that open a fresh SQLite file at the same moment each run MLflow's schema
    migrations and fail ("duplicate column name: step"); the lock lets the first create the
    tables while the others wait, then find them ready.
    """
    # Imported here: the config, which reads DEFAULT_TRACKING_URI, loads without MLflow.
    from mlflow.tracking import MlflowClient

    db_path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if db_path is None or db_path == ":memory:":
        MlflowClient(uri).search_experiments(max_results=1)
        return
    with FileLock(f"{db_path}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        MlflowClient(uri).search_experiments(max_results=1)

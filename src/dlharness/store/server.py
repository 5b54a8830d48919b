"""`dlharness-server`: MLflow's own tracking server for a team, on loopback unless told.

Artifacts are proxied (`--serve-artifacts`): clients upload and download them through the
server over HTTP and never need the server's disk. The backend store is SQLite unless
`$BACKEND_STORE_URI` (or `--backend-store-uri`) names another, e.g. ``postgresql://…``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.tracking.redaction import redact_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_ROOT = "mlserver"
# Seconds a fresh server may take to answer /health: ten times what it took on 2 cores.
START_TIMEOUT_S = 90
# Beside the store, for --basic-auth: the key that signs the UI's forms (CSRF), made once and
# shared by every worker and restart, and the users database with the config naming it.
SECRET_KEY_FILE = "flask-secret-key"
AUTH_DB = "basic_auth.db"
AUTH_CONFIG = "basic_auth.ini"
# MLflow's basic-auth settings but where the users are kept: every user reads every experiment,
# and writes where the admin (or the experiment's creator) granted it.
# MLflow's rules for the admin password it creates (3.17): this length at least, and not the
# default older versions shipped (GHSA-gq3w-7jj3-x7gr).
MIN_ADMIN_PASSWORD = 12
LEGACY_ADMIN_PASSWORD = "password1234"
# MLflow's basic-auth settings but two: where the users are kept (MLflow's default is the
# working directory), and a credential cache. Every user reads every experiment and writes where
# the admin (or the experiment's creator) granted it. MLflow checks each request's password with
# scrypt, CPU-bound work that slowed a training through the server several times over
# (docs/operations.md); a check is cached 30 s per worker process, so a changed password or a
# deleted user reaches the other workers that much later.
AUTH_CONFIG_TEXT = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 30
"""


def server_env(auth_dir: Path | None = None) -> dict[str, str]:
    """The server's environment; with `auth_dir`, what MLflow's basic-auth app needs from it
    (`basic_auth_settings`)."""
    env = dict(os.environ)
    # The job runner serves MLflow's GenAI features, which training does not use; it is a
    # second process and doubles the start time.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # SQLAlchemy's default pool (5 + 10 overflow connections per worker) stalls a worker that
    # serves 32 trainings at once: store requests wait 30 s for a connection and fail, with
    # the server idle (scripts/load_server.py, 2026-11-30; a pool of 60 took the same load
    # with no error). Up to 60 connections per worker: workers × 60 must stay under
    # PostgreSQL's max_connections (100 by default), or set these lower.
    env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "10")
    env.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "50")
    if auth_dir is not None:
        env.update(basic_auth_settings(auth_dir))
    return env


def basic_auth_settings(auth_dir: Path) -> dict[str, str]:
    """The variables MLflow's basic-auth app starts with, kept in `auth_dir`: the CSRF secret
    key (`$MLFLOW_FLASK_SERVER_SECRET_KEY` if set, else one made on first start, mode 0600) and
    the auth config (`$MLFLOW_AUTH_CONFIG_PATH` if set, else one keeping the users in
    `auth_dir/basic_auth.db`, not in the working directory as MLflow's default does).

    Raises:
        UsageError: what is still missing, in one line: MLflow's auth extra, or the admin
            password that the first start needs.
    """
    if importlib.util.find_spec("flask_wtf") is None:
        raise UsageError(
            "--basic-auth needs MLflow's auth extra (Flask-WTF): pip install 'mlflow[auth]'"
        )
    auth_dir.mkdir(parents=True, exist_ok=True)
    settings = {}
    if not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        config = auth_dir / AUTH_CONFIG
        config.write_text(AUTH_CONFIG_TEXT.format(database=(auth_dir / AUTH_DB).resolve()))
        settings["MLFLOW_AUTH_CONFIG_PATH"] = str(config.resolve())
        if not _admin_exists(auth_dir / AUTH_DB):
            _check_admin_password(os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", ""))
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        settings["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _kept_secret_key(auth_dir / SECRET_KEY_FILE)
    return settings


def _admin_exists(database: Path) -> bool:
    """Whether MLflow's users database holds its admin (a first start that failed has none)."""
    if not database.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM users WHERE username = 'admin'").fetchone() is not None
    except sqlite3.Error:
        return False


def _check_admin_password(password: str) -> None:
    """Refuse, before MLflow would with a traceback, an admin password it will not take."""
    if not password:
        raise UsageError(
            "--basic-auth: set MLFLOW_AUTH_ADMIN_PASSWORD to the admin password that "
            "MLflow creates on first start (it has no default)"
        )
    if len(password) < MIN_ADMIN_PASSWORD or password == LEGACY_ADMIN_PASSWORD:
        raise UsageError(
            f"--basic-auth: MLFLOW_AUTH_ADMIN_PASSWORD must have at least {MIN_ADMIN_PASSWORD} "
            "characters and not be MLflow's old default"
        )


def _kept_secret_key(path: Path) -> str:
    if not path.exists():
        # Created readable by its owner only, before anything is written into it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as key_file:
            key_file.write(secrets.token_hex(32))
    return path.read_text().strip()


def auth_dir_for(backend_store_uri: str) -> Path:
    """Where --basic-auth keeps its files: beside a SQLite store, else in `mlserver/`."""
    if backend_store_uri.startswith("sqlite:///"):
        return Path(backend_store_uri.removeprefix("sqlite:///")).resolve().parent
    return Path(DEFAULT_ROOT).resolve()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allowed_hosts: str | None = None,
    basic_auth: bool = False,
    workers: int = 1,
) -> list[str]:
    """The `mlflow server` command line (run with this interpreter's MLflow)."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", artifacts_destination,
        # One worker by default: SQLite takes one writer at a time, and a laptop or CI box has
        # few cores; with PostgreSQL more workers answer more trainings (docs/operations.md).
        "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    if basic_auth:
        command += ["--app-name", "basic-auth"]
    return command


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"mlflow server at {url} did not answer /health in {timeout_s:.0f} s")


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    backend_store_uri: str,
    artifacts_destination: Path,
    port: int | None = None,
    log_path: Path | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` on 127.0.0.1 for the duration of the block: (URL, process)."""
    port = port or free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        server_command(backend_store_uri, str(artifacts_destination), port=port, workers=workers),
        env=server_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group, so that stopping it also stops uvicorn's worker.
        start_new_session=True,
    )
    url = f"http://{DEFAULT_HOST}:{port}"
    try:
        wait_until_healthy(url, process, START_TIMEOUT_S)
        yield url, process
    finally:
        stop_server(process)
        if log_path:
            log.close()


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-server",
        description="Start MLflow's tracking server with proxied artifacts for a team.",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"interface to bind (default: {DEFAULT_HOST}; others need --basic-auth)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help=f"runs and metrics store (default: $BACKEND_STORE_URI, else "
        f"sqlite:///{DEFAULT_ROOT}/mlflow.db)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=f"{DEFAULT_ROOT}/artifacts",
        help="where the server keeps artifacts (default: %(default)s)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host headers accepted, comma-separated (default: MLflow's, localhost only)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (default: 1; more pay off with PostgreSQL, not SQLite)",
    )
    parser.add_argument(
        "--basic-auth",
        action="store_true",
        help="require a user and password (MLflow's basic-auth app; change the admin password)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not is_loopback(args.host) and not args.basic_auth:
            raise UsageError(
                f"--host {args.host} exposes the server beyond this machine: add --basic-auth "
                "(and --allowed-hosts), or keep the default 127.0.0.1"
            )
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {args.workers}")
        backend = (
            args.backend_store_uri
            or os.environ.get("BACKEND_STORE_URI")
            or f"sqlite:///{DEFAULT_ROOT}/mlflow.db"
        )
        if backend.startswith("sqlite:///"):
            Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        artifacts = args.artifacts_destination
        if "://" not in artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            artifacts = str(Path(artifacts).resolve())
        env = server_env(auth_dir_for(backend) if args.basic_auth else None)
    except UsageError as exc:
        print(f"dlharness-server: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = server_command(
        backend, artifacts, args.host, args.port, args.allowed_hosts, args.basic_auth, args.workers
    )
    print(
        f"MLflow server on http://{args.host}:{args.port} (store: {redact_uri(backend)}, "
        f"artifacts: {artifacts})",
        flush=True,
    )
    # Become the server: Ctrl-C and `kill` reach it directly.
    os.execve(command[0], command, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A team server that lets only its users in: `scripts/server.py --basic-auth` started as
docs/operations.md says, users and permissions made through MLflow's own auth client, and
trainings, resumes, syncs, comparisons and the registry through it with credentials from the
environment only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import mlflow.server
import pytest
import requests
from mlflow.tracking import MlflowClient

from dlharness.serving.promote import main as promote_main
from dlharness.store.compare import main as compare_main
from dlharness.store.server import SECRET_KEY_FILE, free_port, stop_server, wait_until_healthy
from dlharness.store.sync import main as sync_main
from dlharness.tracking.spool import Spool
from dlharness.training.cli import main as train_main

from ..conftest import PYTHON, REPO, cli_env, empty_store

ADMIN_PASSWORD = "admin-pass-1234-long"
ANA_PASSWORD = "ana-pass-5678-long"
READER_PASSWORD = "reader-pass-9012-long"
TINY = ["--max-epochs", "2", "--batch-size", "128", "--accelerator", "cpu",
        "--no-system-metrics"]  # fmt: skip


class AuthServer:
    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, **env: str) -> None:
        """As docs/operations.md says: the script, with the admin password on first start."""
        command = [
            PYTHON, str(REPO / "scripts" / "server.py"), "--basic-auth", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (closed when the process ends)
        self.process = subprocess.Popen(
            command, env=cli_env(**env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_until_healthy(self.url, self.process, 90)

    def environ(self) -> dict[str, str]:
        """The running server's environment, as the kernel holds it."""
        raw = Path(f"/proc/{self.process.pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth-server")
    empty_store(folder)  # a ready store: the server answers sooner
    server = AuthServer(folder)
    server.start(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
    try:
        yield server
    finally:
        stop_server(server.process)


def as_user(monkeypatch, user: str | None, password: str | None = None) -> None:
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.fixture(scope="module")
def team(server):
    """The admin makes an experiment `shared` and two users: `reader` (READ on `shared`) and
    `ana` (who trains into experiments of her own)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        as_user(monkeypatch, "admin", ADMIN_PASSWORD)
        admin = mlflow.server.get_app_client("basic-auth", tracking_uri=server.url)
        admin.create_user("reader", READER_PASSWORD)
        admin.create_user("ana", ANA_PASSWORD)
        shared = MlflowClient(server.url).create_experiment("shared")
        admin.grant_user_permission("reader", "experiment", shared, "READ")
    return shared


def runs_in(server: AuthServer, experiment_id: str, monkeypatch) -> int:
    as_user(monkeypatch, "admin", ADMIN_PASSWORD)
    return len(MlflowClient(server.url).search_runs([experiment_id]))


def test_health_answers_anyone_and_the_api_only_its_users(server):
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", ADMIN_PASSWORD), timeout=10).status_code == 200
    assert requests.get(search, auth=("admin", "not-the-password"), timeout=10).status_code == 401


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        (None, None, "asks for a user and password; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ("ana", "wrong-password-0000", "refused the user and password; set MLFLOW_TRACKING_USERNAME"),
        ("reader", READER_PASSWORD, "does not permit reader to create runs in experiment 'shared': that needs the EDIT permission"),
    ],
)  # fmt: skip
def test_a_refused_training_is_one_line_and_leaves_no_run_and_no_spool(
    server, team, tmp_path, monkeypatch, capsys, user, password, expected
):
    monkeypatch.chdir(tmp_path)
    as_user(monkeypatch, user, password)
    capsys.readouterr()
    code = train_main([*TINY, "--tracking-uri", server.url, "--experiment", "shared"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow-spool").exists()
    assert runs_in(server, team, monkeypatch) == 0


def test_a_user_trains_resumes_syncs_compares_and_registers_through_it(
    server, team, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    as_user(monkeypatch, "ana", ANA_PASSWORD)
    base = [*TINY, "--tracking-uri", server.url, "--experiment", "ana"]
    capsys.readouterr()
    assert train_main([*base, "--register", "ana-digits"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    run_id = re.search(r"^run ([0-9a-f]{32}) finished", out, re.MULTILINE).group(1)
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"

    assert train_main(["--resume", run_id, "--max-epochs", "3", "--tracking-uri", server.url]) == 0
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0, 1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"

    # A journal of writes the server missed, replayed through it by dlharness-sync.
    spool = Spool.for_run(tmp_path / "spool", run_id, server.url)
    note = tmp_path / "note.txt"
    note.write_text("written while the server was away")
    spool.append("log_batch", run_id=run_id, metrics=[["late/metric", 1.5, 0, 2]], params=[],
                 tags=[["late.tag", "yes"]])  # fmt: skip
    spool.append("log_artifact", files={"note.txt": note}, run_id=run_id, artifact_path="late")
    capsys.readouterr()
    assert sync_main([str(spool.folder)]) == 0, capsys.readouterr().err
    run = client.get_run(run_id)
    assert run.data.metrics["late/metric"] == 1.5 and run.data.tags["late.tag"] == "yes"
    assert [a.path for a in client.list_artifacts(run_id, "late")] == ["late/note.txt"]

    assert compare_main(["--tracking-uri", server.url, "--experiment", "ana"]) == 0
    assert run_id[:8] in capsys.readouterr().out
    assert promote_main(["ana-digits", "--list", "--tracking-uri", server.url]) == 0
    assert "candidate" in capsys.readouterr().out

    # The passwords were sent as headers only: not in a param, tag, metric or artifact, nor
    # anywhere in the server's files (its users database keeps hashes).
    for path in server.folder.rglob("*"):
        if path.is_file() and path.name != "server.log":
            content = path.read_bytes()
            for secret in (ANA_PASSWORD, ADMIN_PASSWORD):
                assert secret.encode() not in content, path
    assert run.data.tags.get("env.var.MLFLOW_TRACKING_PASSWORD") in (None, "***")


def test_sync_without_credentials_is_one_line(server, team, tmp_path, monkeypatch, capsys):
    as_user(monkeypatch, None)
    spool = Spool.for_run(tmp_path, "0" * 32, server.url)
    spool.append("set_terminated", run_id="0" * 32, status="FINISHED", end_time=0)
    capsys.readouterr()
    assert sync_main([str(spool.folder)]) == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_USERNAME" in err and len(err.strip().splitlines()) == 1, err


def test_a_restart_keeps_the_secret_key_and_needs_no_admin_password(server, team, monkeypatch):
    key_file = server.folder / SECRET_KEY_FILE
    key = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key) == 64
    assert server.environ()["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key
    stop_server(server.process)
    server.start()  # the admin exists: no MLFLOW_AUTH_ADMIN_PASSWORD this time
    assert server.environ()["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key
    as_user(monkeypatch, "ana", ANA_PASSWORD)
    assert MlflowClient(server.url).get_experiment_by_name("ana") is not None


def test_a_first_start_refuses_a_missing_or_weak_admin_password_in_one_line(tmp_path):
    for password in ("", "short"):
        completed = subprocess.run(
            [PYTHON, str(REPO / "scripts" / "server.py"), "--basic-auth",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts")],
            capture_output=True, text=True, timeout=60,
            env=cli_env(**({"MLFLOW_AUTH_ADMIN_PASSWORD": password} if password else {})),
        )  # fmt: skip
        assert completed.returncode == 2, completed.stderr
        assert "MLFLOW_AUTH_ADMIN_PASSWORD" in completed.stderr
        assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr

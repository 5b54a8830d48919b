"""Through a real `mlflow server` (SQLite and PostgreSQL backends): the same training, resume
and comparison as with a local store, artifacts proxied, concurrent runs intact."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from dlharness.store.compare import main as compare_main
from dlharness.store.server import main as server_main
from dlharness.store.server import running_server, server_env
from dlharness.tracking.checkpointing.artifacts import (
    CHECKPOINT_FILE,
    fetch_checkpoint,
    stored_epochs,
)
from dlharness.training.cli import main as train_main

from ..conftest import PYTHON, REPO, artifact_paths, cli_env, empty_store, epoch_histories
from .test_concurrency import integrity, train_concurrently

POSTGRES_URI = os.environ.get("DLHARNESS_TEST_POSTGRES_URI") or None
# .ci/run starts PostgreSQL and sets this: there, a missing database fails instead of skipping.
POSTGRES_REQUIRED = os.environ.get("DLHARNESS_REQUIRE_POSTGRES") == "1"
EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1")
SERVER_YAML = """
data: {batch_size: 128}
model: {width: 8}
trainer: {max_epochs: 3, accelerator: cpu}
tracking: {system_metrics: false, experiment: team}
tracker: {onnx: false}
"""
RUN_LINE = re.compile(r"^run ([0-9a-f]{32}) finished", re.MULTILINE)


@dataclass
class Server:
    url: str
    artifacts: Path
    log: Path
    # The SQLite file behind the server; None for PostgreSQL.
    db_path: Path | None
    pid: int


def fresh_postgres_database() -> str:
    """A new, empty database on the test PostgreSQL, so each session starts clean."""
    if POSTGRES_URI is None:
        message = "no PostgreSQL: set DLHARNESS_TEST_POSTGRES_URI (.ci/start-postgres starts one)"
        if POSTGRES_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    import psycopg

    name = f"dlharness_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URI, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return POSTGRES_URI.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"server-{request.param}")
    db_path = folder / "server.db" if request.param == "sqlite" else None
    backend = empty_store(folder, db_path.name) if db_path else fresh_postgres_database()
    artifacts = folder / "artifacts"
    log = folder / "server.log"
    # PostgreSQL takes concurrent writers: there the server runs 2 workers, as a team's would.
    workers = 1 if db_path else 2
    with running_server(backend, artifacts, log_path=log, workers=workers) as (url, process):
        yield Server(url, artifacts, log, db_path, process.pid)


def train_cli(*argv: str) -> str:
    """Run the real CLI in this process and return the id of the run it reports."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main(list(argv)) == 0
    return RUN_LINE.search(out.getvalue()).group(1)


def train_then_resume(config: Path, uri: str) -> str:
    run_id = train_cli("--config", str(config), "--tracking-uri", uri, "--run-name", "team")
    resumed = train_cli("--resume", run_id, "--max-epochs", "4", "--tracking-uri", uri)
    assert resumed == run_id
    return run_id


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("team-config") / "team.yaml"
    path.write_text(SERVER_YAML)
    return path


@pytest.fixture(scope="module")
def local_reference(config_file, tmp_path_factory) -> tuple[str, str]:
    """(store URI, run id): the same training and resume against a local SQLite file."""
    uri = empty_store(tmp_path_factory.mktemp("local"))
    return uri, train_then_resume(config_file, uri)


def test_training_resume_and_compare_through_the_server_match_a_local_store(
    server, config_file, local_reference, tmp_path
):
    local_uri, local_run = local_reference
    run_id = train_then_resume(config_file, server.url)
    remote, local = MlflowClient(server.url), MlflowClient(local_uri)
    ours, theirs = remote.get_run(run_id), local.get_run(local_run)

    assert ours.info.status == theirs.info.status == "FINISHED"
    without_uri = lambda params: {k: v for k, v in params.items() if k != "tracking.tracking_uri"}  # noqa: E731
    assert without_uri(ours.data.params) == without_uri(theirs.data.params)
    assert ours.data.params["tracking.tracking_uri"] == server.url
    histories = epoch_histories(remote, run_id, EPOCH_KEYS)
    assert [step for step, _ in histories["val/loss"]] == [0, 1, 2, 3]
    assert histories == epoch_histories(local, local_run, EPOCH_KEYS)
    assert artifact_paths(remote, run_id) == artifact_paths(local, local_run)
    assert stored_epochs(remote, run_id) == stored_epochs(local, local_run) == [0, 1, 2, 3]

    # Proxied artifacts: the client only ever saw an mlflow-artifacts: URI (HTTP through the
    # server), and the files are in the server's own artifact folder.
    assert ours.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list(server.artifacts.rglob(f"{run_id}/artifacts/checkpoints/epoch_3/{CHECKPOINT_FILE}"))
    ckpt_ours = torch.load(fetch_checkpoint(remote, run_id, 3, tmp_path / "a"), weights_only=True)
    ckpt_theirs = torch.load(
        fetch_checkpoint(local, local_run, 3, tmp_path / "b"), weights_only=True
    )
    for name, tensor in ckpt_theirs["state_dict"].items():
        assert torch.equal(ckpt_ours["state_dict"][name], tensor), name

    mlflow.set_tracking_uri(server.url)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    mlflow.set_tracking_uri(local_uri)
    reference = mlflow.pytorch.load_model(f"runs:/{local_run}/model")
    batch = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(batch), reference(batch))

    tables = []
    for uri, run in ((server.url, run_id), (local_uri, local_run)):
        csv_path = tmp_path / f"{len(tables)}.csv"
        assert compare_main([run, "--tracking-uri", uri, "--csv", str(csv_path)]) == 0
        tables.append(csv_path.read_text().replace(run, "RUN").replace(run[:8], "RUN"))
    assert tables[0] == tables[1]


def listening_addresses(pid: int) -> set[str]:
    parent = psutil.Process(pid)
    addresses = set()
    for process in [parent, *parent.children(recursive=True)]:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                addresses.add(connection.laddr.ip)
    return addresses


def test_server_listens_on_loopback_only_and_refuses_a_foreign_host_header(server):
    """Bound to 127.0.0.1; and the DNS-rebinding guard: a page on another site that resolves
    its name to 127.0.0.1 still cannot talk to the server."""
    assert listening_addresses(server.pid) == {"127.0.0.1"}
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 200
    refused = requests.get(search, headers={"Host": "attacker.example"}, timeout=10)
    assert refused.status_code == 403


def test_server_script_refuses_to_expose_itself_without_auth():
    completed = subprocess.run(
        [PYTHON, str(REPO / "scripts" / "server.py"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1
    assert "--basic-auth" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_server_gets_a_connection_pool_for_32_trainings_unless_told(monkeypatch):
    monkeypatch.delenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", raising=False)
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "5")
    env = server_env()
    assert env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] == "10"
    assert env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] == "5"  # the user's own setting stays


def test_server_script_refuses_no_workers(capsys):
    assert server_main(["--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_four_trainings_at_once_through_the_server(server, tmp_path):
    train_concurrently(server.url, tmp_path)
    assert integrity(server.db_path) == "ok"


LIBRARY_CALL = """
import json, os
import dlharness
before = dict(os.environ)
result = dlharness.train(dlharness.load_config({config!r}, {{"tracking.tracking_uri": {url!r}}}))
after = dict(os.environ)
print(json.dumps({{"status": result is not None, "changed": sorted(
    key for key in set(before) | set(after) if before.get(key) != after.get(key))}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_train_as_a_library_call_leaves_mlflows_variables_as_it_found_them(
    server, config_file, tmp_path
):
    """In a fresh interpreter, as a user's own script calls it against an http:// store."""
    code = LIBRARY_CALL.format(config=str(config_file), url=server.url)
    completed = subprocess.run(
        [PYTHON, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["status"]
    # dlharness's own (MLFLOW_HTTP_REQUEST_*, set while it sends) are gone again, and so are
    # those MLflow's fluent set_tracking_uri/set_experiment set while it trained. What
    # Lightning's seeding and determinism set for the process is theirs (docs/callback.md).
    assert [key for key in report["changed"] if key.startswith("MLFLOW_")] == []

"""The rules the spool goes by, without a server: what counts as an outage, a refusal, the
HTTP settings set and put back, and a journal's bookkeeping."""

from __future__ import annotations

import os
import threading

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from dlharness.tracking.spool import (
    HTTP_DEFAULTS,
    ServerSilentError,
    Spool,
    http_defaults,
    is_unreachable,
)
from dlharness.tracking.store_access import server_refusal

OUTAGES = [
    requests.ConnectionError("refused"),
    requests.ReadTimeout("read timed out"),
    ServerSilentError("known to be silent"),
    MlflowException("API request to http://h/api failed with exception Max retries exceeded"),
    MlflowException("API request to http://h/api failed with timeout exception Read timed out"),
    MlflowException("API request failed with error code 503 != 200: HTTP 503"),
]
REFUSALS = [
    MlflowException("failed with error code 401 != 200", error_code=UNAUTHENTICATED),
    MlflowException("Permission denied", error_code=PERMISSION_DENIED),
    MlflowException("Changing param values is not allowed"),
    ValueError("a bug"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=repr)
def test_an_unanswered_request_is_an_outage(exc):
    assert is_unreachable(exc)


@pytest.mark.parametrize("exc", REFUSALS, ids=repr)
def test_a_refusal_is_not_an_outage(exc):
    assert not is_unreachable(exc)


@pytest.mark.parametrize(
    ("exc", "username", "expected"),
    [
        (REFUSALS[0], None, "it asks for a user and password; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (REFUSALS[0], "ana", "refused the user and password; set MLFLOW_TRACKING_USERNAME"),
        (REFUSALS[1], "ana", "does not permit ana to create runs: that needs the EDIT permission"),
        (REFUSALS[2], "ana", None),
        (OUTAGES[3], "ana", None),
    ],
)  # fmt: skip
def test_refusals_name_the_variables_or_the_permission(monkeypatch, exc, username, expected):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    if username:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    line = server_refusal(exc, "http://team:5000", "to create runs")
    assert (line is None) if expected is None else (expected in line), line


@pytest.mark.parametrize("own", [None, "30"])
def test_http_settings_are_dlharness_only_while_it_sends_also_nested_and_threaded(monkeypatch, own):
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    if own:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", own)
    before = {key: os.environ.get(key) for key in HTTP_DEFAULTS}
    inside = threading.Event()
    leave = threading.Event()

    def other_thread() -> None:
        with http_defaults():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_thread)
    with http_defaults():
        thread.start()
        inside.wait(10)
        with http_defaults():
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == (own or "5")
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    # The other thread is still inside: the settings stay until it leaves.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    leave.set()
    thread.join()
    assert {key: os.environ.get(key) for key in HTTP_DEFAULTS} == before


def test_a_journal_counts_what_waits_and_continues_its_numbers(tmp_path):
    spool = Spool(tmp_path / "run", {"run_id": "r", "tracking_uri": "http://h"})
    assert spool.waiting() == 0 and not spool.pending
    for step in range(3):
        spool.append("log_batch", run_id="r", metrics=[["m", 1.0, 0, step]], params=[], tags=[])
    assert spool.waiting() == 3
    spool._mark_replayed(2)
    assert spool.waiting() == 1
    # A later process takes the journal up where it stands.
    again = Spool.load(tmp_path / "run")
    again.append("set_terminated", run_id="r", status="FINISHED", end_time=0)
    assert [e["seq"] for e in again.entries()] == [1, 2, 3, 4] and again.waiting() == 2

"""The server load test keeps working: K = 1, 2 for a few seconds against a real server.

No latency is asserted here; the measured table lives in docs/operations.md.
"""

from __future__ import annotations

import json
import os

import pytest

from ..conftest import bench_module, empty_store

load = bench_module("server_load")


@pytest.mark.slow
def test_two_levels_against_a_server_it_starts_and_stops(tmp_path):
    out = tmp_path / "load.json"
    before = {name: os.environ.get(name) for name in load.CLIENT_SETTINGS}
    argv = ["--levels", "1,2", "--seconds", "3", "--epoch-s", "0.5", "--checkpoint-mb", "0.2"]
    argv += ["--backend-store-uri", empty_store(tmp_path, "server.db")]
    assert load.main([*argv, "--out", str(out)]) == 0
    # Its client settings (no retries) do not outlive it.
    assert {name: os.environ.get(name) for name in load.CLIENT_SETTINGS} == before

    report = json.loads(out.read_text())
    assert report["backend"] == "sqlite"
    assert [level["trainings"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["errors"] == 0
        by_request = level["latency_ms_by_request"]
        assert {"create_run", "log_params", "log_metrics", "log_checkpoint", "log_image"} <= set(
            by_request
        )
        # Every training did at least one epoch's writes, each timed.
        assert by_request["log_metrics"]["count"] >= level["trainings"]
        assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["artifact_mb_per_s"] > 0
        assert level["server_cpu_percent"] > 0
    assert set(report["latency_doubles_at"]) == {"p50", "p99"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tracking-uri", "http://10.1.2.3:5000"], "loopback only"),
        (["--levels", "1,x"], "--levels"),
        (["--levels", "1,2", "--seconds", "600", "--max-seconds", "60"], "--max-seconds"),
    ],
)
def test_bad_arguments_stop_before_any_load(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        load.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_latency_doubling_is_found_against_the_first_level():
    levels = [{"trainings": k, "latency_ms": {"p50": p50, "p99": 9.0}} for k, p50 in
              [(1, 10.0), (2, 12.0), (4, 21.0), (8, 50.0)]]  # fmt: skip
    assert load.latency_doubles_at(levels, "p50") == 4
    assert load.latency_doubles_at(levels, "p99") is None

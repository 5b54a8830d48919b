"""docs/tutorial.md runs as written: every command of its `bash` blocks, in order.

`python scripts/X.py …` runs the repository's script and `dlharness-X …` that entry point, in this process
(as `python` would, with the same argv: the import of torch, Lightning and MLflow is paid
once, not per command), against a temporary store named by $MLFLOW_TRACKING_URI. `RUN_ID`
is the first run's id, as the tutorial says.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from importlib.metadata import entry_points

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, make_store

pytestmark = pytest.mark.slow

TUTORIAL = REPO / "docs" / "tutorial.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"^(make|python|dlharness-)")


def tutorial_commands() -> list[str]:
    lines = [
        line for block in BASH_BLOCK.findall(TUTORIAL.read_text()) for line in block.splitlines()
    ]
    return [line.strip() for line in lines if COMMAND.match(line.strip())]


def run(command: str) -> int:
    argv = shlex.split(command, comments=True)
    sys.argv = argv[1:] if argv[0] == "python" else argv
    try:
        if argv[0] == "python":
            runpy.run_path(str(REPO / argv[1]), run_name="__main__")
        else:
            [entry] = entry_points(group="console_scripts", name=argv[0])
            return entry.load()(argv[1:])
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_the_tutorials_commands_run_as_written(tmp_path, monkeypatch, capsys):
    commands = tutorial_commands()
    # What the tutorial's text promises is there: two trainings, a resume, compare, promote.
    assert [c.split()[:2] for c in commands].count(["python", "scripts/train.py"]) == 3
    assert not [c for c in commands if c.startswith("make")]  # make lines are `console` only
    uri = make_store(tmp_path, experiment="dlharness")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # what the commands write into the working folder lands here
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dlharness").experiment_id
    first_run = None
    for command in commands:
        if "RUN_ID" in command:
            command = command.replace("RUN_ID", first_run)
        assert run(command) == 0, f"{command}\n{capsys.readouterr().err[-2000:]}"
        if first_run is None:
            [only] = client.search_runs([experiment])
            first_run = only.info.run_id
    out = capsys.readouterr().out
    runs = client.search_runs([experiment])
    assert len(runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    # The resumed first run went on to epoch 5, each epoch logged once.
    steps = [m.step for m in client.get_metric_history(first_run, "val/acc")]
    assert steps == list(range(6))
    aliases = client.get_registered_model("digits").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {
        "candidate": "1",
        "champion": "1",
    }
    assert "digits@champion → version 1: first champion" in out
    assert (tmp_path / f"confusion-{first_run[:8]}-epochs-1-3.png").is_file()

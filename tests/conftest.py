"""Shared fixtures: a real SQLite tracking store per test, tiny real configs, one default run."""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import multiprocessing.util
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import lightning as L
import mlflow
import pytest
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from dlharness.tracking.provenance.installed_packages import CACHE_DIR_ENV
from dlharness.training.collector import freeze_long_lived_objects
from dlharness.training.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]

# Each test session (each pytest-xdist worker) gets a temporary folder of its own, inherited by
# its subprocesses through TMPDIR: tests that check that nothing was left behind in it see
# their own session's files only.
_SESSION_TMP = tempfile.mkdtemp(prefix="pytest-session-")
tempfile.tempdir = os.environ["TMPDIR"] = _SESSION_TMP
# Removed at exit after multiprocessing has removed its own folder in it (its finalizer runs at
# priority -100; a plain atexit handler would run first and make that one fail loudly).
multiprocessing.util.Finalize(
    None, shutil.rmtree, args=(_SESSION_TMP,), kwargs={"ignore_errors": True}, exitpriority=-200
)

# torch's own choice on this machine, before the workers change it.
TORCH_THREADS, OMP_THREADS = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each (and in what they start), or the two
    # thread pools contend for the same cores (measured: the suite slower than one worker).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


# A full collection traces every object alive: the ≈600 000 torch, Lightning and MLflow leave
# on import and what each test's imports add (0.3–0.4 s a collection, ≈7 % of a test process's
# time, measured 2026-12-01). What is alive now (and at exit), as the training commands do,
# and also what survives each full collection, is frozen out of the next ones; it is still
# freed when its last reference goes.
freeze_long_lived_objects()
gc.callbacks.append(_freeze_survivors)

# The costliest test files first (seconds of work each, measured on 2 cores, with CI's
# PostgreSQL tests added, 2026-12-01: resume 86, server 82, sweep 76, multinode 75, dvc 71,
# serving 41, bench 35, ui 34, cli 29, harness_options 25, examples 22; 2026-12-04: outage
# 130 with its frozen-server tests, auth 26; the rest under 20). `make test` passes
# --no-loadscope-reorder, so pytest-xdist hands files out in this order instead of by test
# count, which left the long files with few tests to run alone at the end (CI: 441 s against
# 356 s balanced).
COSTLIEST_FILES_FIRST = (
    "test_outage.py", "test_resume.py", "test_server.py", "test_sweep.py", "test_multinode.py",
    "test_dvc.py", "test_serving.py", "test_bench.py", "test_ui.py", "test_logged_models.py",
    "test_cli.py", "test_auth.py", "test_harness_options.py", "test_examples.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return COSTLIEST_FILES_FIRST.index(name) if name in COSTLIEST_FILES_FIRST else 99

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(autouse=True)
def _no_experiment_variables(monkeypatch):
    """Each test starts with no experiment variables but its own: `mlflow.set_experiment`,
    which the harness calls (in module fixtures too), sets ``$MLFLOW_EXPERIMENT_ID`` for the
    whole process, and a new run of MlflowTracking's goes where it points."""
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def torch_default_threads():
    """torch's default thread count in this process and the ones it starts, for a module whose
    tests compare trainings with layouts (NHWC vs NCHW) that sum in a different order: their
    agreement to 1e-6 holds with the default count, not with one thread (1e-4 apart by epoch 3).
    """
    with pytest.MonkeyPatch.context() as patch:
        if OMP_THREADS is None:
            patch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            patch.setenv("OMP_NUM_THREADS", OMP_THREADS)
        threads = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        yield
        torch.set_num_threads(threads)


def repo_module(relative: str) -> ModuleType:
    """A module of the repository outside the installed package (bench/, tools/), imported."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py, which lives outside the installed package, imported as a module."""
    return repo_module(f"bench/{name}.py")


# An empty SQLite store, made once per session: creating MLflow's tables (its migrations) takes
# about 2 s a store here, copying the file 0.06 s. Tests of creating a store start from none.
_EMPTY_STORE: list[Path] = []


def empty_store(folder: Path, name: str = "mlflow.db") -> str:
    """A fresh, empty SQLite store `folder/name` (a copy of one MLflow created this session).

    A server started on such a copy answers ≈4 s sooner than on a new file.
    """
    if not _EMPTY_STORE:
        template = Path(tempfile.mkdtemp(prefix="pytest-empty-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _EMPTY_STORE.append(template)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], folder / name)
    return f"sqlite:///{folder / name}"


def make_store(folder: Path, experiment: str = "tests") -> str:
    """A fresh SQLite store whose experiment keeps its artifacts inside `folder`."""
    uri = empty_store(folder)
    MlflowClient(uri).create_experiment(
        experiment, artifact_location=(folder / "artifacts").as_uri()
    )
    return uri


def tiny_config(uri: str, **overrides) -> TrainConfig:
    """The digits set with a narrow CNN for a few epochs: seconds per run on 2 cores."""
    values = {
        "trainer.max_epochs": 2,
        "trainer.accelerator": "cpu",
        "data.batch_size": 128,
        "model.width": 8,
        "tracking.tracking_uri": uri,
        "tracking.experiment": "tests",
    }
    values.update(overrides)
    return load_config(None, values)


def run_statuses(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    return [r.info.status for r in runs]


def assert_nothing_running(uri: str) -> None:
    assert RunStatus.to_string(RunStatus.RUNNING) not in run_statuses(uri)


# A logged image's file name carries its timestamp and a uuid: runs differ there by design.
LOGGED_IMAGE_ID = re.compile(r"\+timestamp\+\d+\+[0-9a-f-]+")


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact's path in the run, logged images' names without timestamp and uuid."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= artifact_paths(client, run_id, info.path)
        else:
            found.add(LOGGED_IMAGE_ID.sub("", info.path))
    return found


def epoch_histories(
    client: MlflowClient, run_id: str, keys: tuple[str, ...]
) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each metric in `keys`, by step."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


class AfterStoredCheckpoint(L.Callback):
    """Calls `act()` at the start of epoch `epoch`, once epoch `epoch - 1`'s checkpoint record
    is in the artifact folder `artifacts` (uploads lag training by up to one epoch): a fault
    injected there falls at the same point of training however fast the machine is."""

    def __init__(self, artifacts: Path, epoch: int, act: Callable[[], object]) -> None:
        self.artifacts, self.epoch, self.act = artifacts, epoch, act

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        record = f"**/checkpoints/epoch_{self.epoch - 1}/checkpoint_metrics.json"
        deadline = time.monotonic() + 120
        while not any(self.artifacts.glob(record)) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.act()


class SignalWindow(AfterStoredCheckpoint):
    """From the start of epoch `epoch`, once epoch `epoch - 1`'s checkpoint is stored, `marker`
    exists and every training batch takes `batch_s` longer: a signal that a test sends when it
    sees the marker lands in that epoch's batches however fast the machine trains."""

    def __init__(self, artifacts: Path, epoch: int, marker: Path, batch_s: float = 0.05) -> None:
        super().__init__(artifacts, epoch, marker.touch)
        self.batch_s = batch_s

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.current_epoch >= self.epoch:
            time.sleep(self.batch_s)


def cli_trains_with(monkeypatch: pytest.MonkeyPatch, *callbacks: L.Callback) -> None:
    """The CLI's `train()` (`dlharness.training.cli.main`) gets `callbacks` beside its own."""
    import dlharness.training.train as train_module

    trains = functools.partial(train_module.train, callbacks=list(callbacks))
    monkeypatch.setattr(train_module, "train", trains)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture
def store(tmp_path: Path) -> str:
    return make_store(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """The suite's package-index cache, apart from the user's (subprocesses inherit it)."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ[CACHE_DIR_ENV]
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True)
def _no_leaked_active_run():
    """A test that leaves an MLflow run active would make the next test's run fail to start."""
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


DEFAULT_RUN_TAGS = {"author": "tests", "description": "the default run, read back by the tests"}
REGISTERED_NAME = "digits-default"


@dataclasses.dataclass
class DefaultRun:
    cfg: TrainConfig
    result: object
    scratch_left: list[Path]

    def __iter__(self):
        return iter((self.cfg, self.result))


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> DefaultRun:
    """The default config (digits, 20 epochs), trained once and read back by many tests.

    It also registers its model, and samples system metrics every second so that a run this
    short has some.
    """
    folder = tmp_path_factory.mktemp("default_run")
    uri = make_store(folder, experiment="dlharness")
    overrides = {
        "tracking.tracking_uri": uri,
        "tracking.tags": DEFAULT_RUN_TAGS,
        "tracking.register_model": REGISTERED_NAME,
    }
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    from dlharness.training.train import train

    scratch_before = set(Path(tempfile.gettempdir()).glob("dlharness-*"))
    previous = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    try:
        result = train(cfg)
    finally:
        if previous is None:
            del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
        else:
            os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = previous
    scratch_left = set(Path(tempfile.gettempdir()).glob("dlharness-*")) - scratch_before
    return DefaultRun(cfg, result, sorted(scratch_left))


@pytest.fixture
def logged_default_run(default_run: DefaultRun):
    """(config, result, client, run entity) of the default run, with MLflow pointed at it."""
    cfg, result = default_run
    mlflow.set_tracking_uri(result.tracking_uri)
    client = MlflowClient(result.tracking_uri)
    return cfg, result, client, client.get_run(result.run_id)

"""Two "nodes" on one machine, for real: two processes on loopback that meet over gloo, started
by torchrun, by Lightning's own launcher and as SLURM's `srun` would start them.

Each node runs in its own folder, as on two machines, and node 1 starts first: a node that
opened the tracking store would leave `mlflow.db` (or `mlruns/`) in its folder, or race node 0
creating the tables of its fresh SQLite file.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dlharness.store.compare import main as compare_main
from dlharness.store.server import free_port
from dlharness.tracking.checkpointing.artifacts import stored_epochs
from dlharness.training.distributed import is_launch_leader

from ..conftest import PYTHON, REPO, assert_nothing_running, cli_env, epoch_histories

TRAIN = str(REPO / "scripts" / "train.py")
EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1", "val/auroc")
# 270 validation samples split evenly between 2 ranks: no sample is padded in twice, so the
# metrics the ranks agree on are those of the whole validation split.
NODE_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 2, accelerator: cpu, devices: 1, num_nodes: 2, strategy: ddp}
tracking: {system_metrics: false, experiment: nodes}
tracker: {onnx: false}
"""
# Seconds a two-node launch may take (≈20 s here) before the test kills both nodes.
LAUNCH_TIMEOUT_S = 240


@dataclass
class Node:
    folder: Path
    out: str
    err: str
    returncode: int


def launch(tmp_path: Path, name: str, command, env_for) -> list[Node]:
    """Start node 1, then node 0, each in its own folder; wait for both (kill both on a hang)."""
    folders = [tmp_path / f"{name}-node{rank}" for rank in (0, 1)]
    processes = {}
    for rank in (1, 0):
        folders[rank].mkdir()
        (folders[rank] / "nodes.yaml").write_text(NODE_YAML)
        processes[rank] = subprocess.Popen(
            command(rank),
            cwd=folders[rank],
            env=cli_env(**env_for(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    nodes = []
    for rank in (0, 1):
        try:
            out, err = processes[rank].communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for process in processes.values():
                os.killpg(process.pid, signal.SIGKILL)
            out, err = processes[rank].communicate()
            pytest.fail(f"node {rank} of {name} hung:\n{err[-3000:]}")
        nodes.append(Node(folders[rank], out, err, processes[rank].returncode))
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: {node.err[-3000:]}"
    return nodes


def torchrun(port: int, *argv: str):
    def command(rank: int) -> list[str]:
        launcher = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2"]
        launcher += ["--nproc-per-node", "1", "--node-rank", str(rank)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
        return [*launcher, TRAIN, *argv]

    return command


def lightning_env(port: int):
    """What a user sets on each machine for Lightning's own launcher."""
    return lambda rank: {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NODE_RANK": str(rank),
    }


def slurm_env(port: int):
    """What `srun --nodes 2 --ntasks-per-node 1` sets in each task (MASTER_* as a job script
    exports them; without, Lightning takes the first host of SLURM_NODELIST)."""
    return lambda rank: {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dlharness",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def assert_rank_zero_alone(nodes: list[Node]) -> None:
    """Node 0 reports one run; node 1 trained its shard, reported nothing, opened no store."""
    assert nodes[0].out.count(" finished: ") == 1
    assert " finished: " not in nodes[1].out
    assert "Traceback" not in nodes[1].err
    assert sorted(p.name for p in nodes[1].folder.iterdir()) == ["nodes.yaml"]


def only_run(uri: str, experiment: str = "nodes"):
    client = MlflowClient(uri)
    [found] = client.search_experiments(filter_string=f"name = '{experiment}'")
    return client, client.search_runs([found.experiment_id])


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[str, str, list[Node]]:
    """(store URI, run id, nodes): 2 epochs on two torchrun nodes into node 0's default store."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    nodes = launch(
        tmp_path, "torchrun", torchrun(free_port(), "--config", "nodes.yaml"), lambda rank: {}
    )
    uri = f"sqlite:///{nodes[0].folder / 'mlflow.db'}"
    _, runs = only_run(uri)
    [run] = runs
    return uri, run.info.run_id, nodes


def scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("dlharness-checkpoints-*"))


@pytest.mark.slow
def test_two_torchrun_nodes_log_one_run_that_resumes_the_same_on_one_node_or_two(
    torchrun_run, tmp_path
):
    uri, run_id, nodes = torchrun_run
    assert_rank_zero_alone(nodes)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["env.nodes"], run.data.tags["env.world_size"]) == ("2", "2")
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
    assert stored_epochs(client, run_id) == [0, 1]

    # The validation metrics the two ranks agreed on are those of the whole validation split:
    # one process's evaluation of the stored checkpoints gives the same numbers.
    table = tmp_path / "eval.csv"
    argv = ["--run", run_id, "--epochs", "0,1", "--evaluate", "--split", "val"]
    argv += ["--csv", str(table), "--plot", str(tmp_path / "cm.png"), "--tracking-uri", uri]
    assert compare_main(argv) == 0
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    for row in rows:
        for key in ("val/loss", "val/acc", "val/f1", "val/auroc"):
            logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            assert float(row[key]) == pytest.approx(logged[int(row["epoch"])], abs=1e-5), key

    # Continued on two nodes through Lightning's launcher, as a fork: every node reads the
    # checkpoint (so both must reach the store), node 0 alone writes.
    scratch_before = scratch_folders()
    more = ["--resume", run_id, "--max-epochs", "3", "--tracking-uri", uri]
    nodes = launch(
        tmp_path, "lightning", lambda rank: [PYTHON, TRAIN, *more, "--fork"],
        lightning_env(free_port()),
    )  # fmt: skip
    assert_rank_zero_alone(nodes)
    [fork] = [r for r in only_run(uri)[1] if r.info.run_id != run_id]
    assert fork.data.tags["dlharness.parent_run_id"] == run_id

    # The run itself resumed on one machine with two devices (Lightning starts the second).
    one_node = subprocess.run(
        [PYTHON, TRAIN, *more, "--num-nodes", "1", "--devices", "2"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert f"run {run_id} finished" in one_node.stdout

    run = client.get_run(run_id)
    assert (run.data.tags["env.nodes"], run.data.tags["env.devices"]) == ("1", "2")
    assert stored_epochs(client, run_id) == [0, 1, 2]
    assert stored_epochs(client, fork.info.run_id) == [2]
    for resumed in (run, fork):
        assert resumed.data.tags["dlharness.resumed_from_epoch"] == "1"
    # Bit for bit: the same two ranks, whichever machines they run on.
    histories = epoch_histories(client, run_id, EPOCH_KEYS)
    assert histories == epoch_histories(client, fork.info.run_id, EPOCH_KEYS)
    assert [step for step, _ in histories["val/acc"]] == [0, 1, 2]
    assert len(only_run(uri)[1]) == 2
    assert_nothing_running(uri)
    assert scratch_folders() == scratch_before


@pytest.mark.slow
def test_a_fresh_slurm_launch_gives_the_torchrun_run_bit_for_bit(torchrun_run, tmp_path):
    """SLURM's variables into a fresh default store (Lightning's own launcher, the same but
    for its variables, is the one the other test resumes with)."""
    uri, run_id, _ = torchrun_run
    nodes = launch(
        tmp_path, "slurm", lambda rank: [PYTHON, TRAIN, "--config", "nodes.yaml"],
        slurm_env(free_port()),
    )  # fmt: skip
    assert_rank_zero_alone(nodes)
    fresh_uri = f"sqlite:///{nodes[0].folder / 'mlflow.db'}"
    client, [run] = only_run(fresh_uri)
    assert run.info.status == "FINISHED"
    # The torchrun run's first two epochs (the other test may have resumed it to a third).
    torchrun_epochs = {
        key: [(step, value) for step, value in history if step < 2]
        for key, history in epoch_histories(MlflowClient(uri), run_id, EPOCH_KEYS).items()
    }
    assert epoch_histories(client, run.info.run_id, EPOCH_KEYS) == torchrun_epochs


@pytest.mark.parametrize(
    ("env", "leads"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun, rank 0
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun, another rank
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's launcher started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first process of the second node
        ({"NODE_RANK": "1"}, False),  # the launching process on the second node
        ({"SLURM_PROCID": "2"}, False),  # srun task 2
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # one SLURM task, Lightning's child
        ({"SLURM_PROCID": "0"}, True),
    ],
)
def test_only_global_rank_zero_leads(monkeypatch, env, leads):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_launch_leader() is leads

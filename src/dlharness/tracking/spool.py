"""Tracking outages: what cannot reach the tracking server is kept on disk, in order, and
replayed into the run later (`dlharness-sync`).

From the first write that fails because the server does not answer, every later write of the
run goes to the spool too, so the replay keeps the order in which things happened. A spool is
one folder per run: `meta.json` (run id, tracking URI), `journal.jsonl` (one operation a
line, flushed and fsynced as written) and `files/` (the artifacts, copied).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import requests
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.protos.service_pb2 import DatasetInput as ProtoDatasetInput
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from dlharness.tracking.artifact_file import log_written_file

JOURNAL = "journal.jsonl"
SYNCED = "journal.synced.jsonl"
PROGRESS = "replayed.json"
# Seconds a request may wait for an answer, and retries, for http(s) stores unless set: MLflow's
# defaults (120 s, 7 retries with back-off) would stall tracking for minutes per call.
HTTP_TIMEOUT_S = "10"
HTTP_MAX_RETRIES = "2"
# Text of MLflow's errors when its REST client gave up on reaching the server.
UNREACHABLE_SIGNS = (
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "Read timed out",
    "timed out",
    "RemoteDisconnected",
    "ConnectionError",
    "HTTP 502",
    "HTTP 503",
    "HTTP 504",
)


class SpoolWarning(UserWarning):
    """The tracking server stopped answering; writes now go to a local spool."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server could not be reached (not that it refused)."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    text = f"{exc} {exc.__cause__ or ''}"
    return any(sign in text for sign in UNREACHABLE_SIGNS)


def set_http_defaults(tracking_uri: str) -> None:
    if tracking_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)


class Spool:
    """The append-only journal of one run's unsent writes."""

    _open: ClassVar[dict[Path, Spool]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, folder: Path, meta: dict[str, str]) -> None:
        self.folder = folder
        self.meta = meta
        self._lock = threading.Lock()
        self._count = 0

    @classmethod
    def for_run(cls, root: str | os.PathLike, run_id: str, tracking_uri: str) -> Spool:
        """The one Spool object of this run in this process (threads share its order).

        Nothing is written until the first operation is spooled.
        """
        folder = Path(root).resolve() / run_id
        with cls._open_lock:
            if folder not in cls._open:
                cls._open[folder] = cls(folder, {"run_id": run_id, "tracking_uri": tracking_uri})
            return cls._open[folder]

    @classmethod
    def load(cls, folder: Path) -> Spool:
        """An existing spool folder, for replay."""
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a dlharness spool (no meta.json)")
        return cls(folder, json.loads(meta_path.read_text()))

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def pending(self) -> bool:
        return (self.folder / JOURNAL).exists()

    @property
    def count(self) -> int:
        return self._count

    def append(self, op: str, files: dict[str, str | os.PathLike] | None = None, **fields) -> None:
        """Journal one operation; `files` (name → local path) are copied in first."""
        with self._lock:
            if self._count == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / "meta.json").write_text(json.dumps(self.meta))
            self._count += 1
            entry: dict[str, Any] = {"op": op, "seq": self._count, **fields}
            if files:
                target = self.folder / "files" / str(self._count)
                target.mkdir(parents=True, exist_ok=True)
                copied = {}
                for name, path in files.items():
                    source = Path(path)
                    if source.is_dir():
                        shutil.copytree(source, target / name)
                    else:
                        shutil.copy2(source, target / name)
                    copied[name] = str((target / name).relative_to(self.folder))
                entry["files"] = copied
            with open(self.folder / JOURNAL, "a", encoding="utf-8") as journal:
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
                os.fsync(journal.fileno())

    def entries(self) -> Iterator[dict[str, Any]]:
        path = self.folder / JOURNAL
        if not path.exists():
            return
        with open(path, encoding="utf-8") as journal:
            for line in journal:
                if line.strip():
                    yield json.loads(line)

    def file(self, entry: dict[str, Any], name: str) -> Path:
        return self.folder / entry["files"][name]


class SpoolingClient(MlflowClient):
    """MlflowClient whose writes go to a `Spool` once the tracking server stops answering.

    MLflow's higher-level helpers (`log_text`, `log_dict`, `log_table`, `log_figure`,
    `log_image`) end in `log_artifact` and `set_tag`, so overriding the primitive writes covers
    them all. Reads are not spooled: they fail as usual.
    """

    def __init__(self, tracking_uri: str, spool_root: str | os.PathLike, run_id: str) -> None:
        super().__init__(tracking_uri)
        self.spool = Spool.for_run(spool_root, run_id, tracking_uri)
        self.offline = False
        self._repositories: dict[str, Any] = {}
        # The tables the run lists in MLflow's `mlflow.loggedArtifacts` tag, read at the first.
        self._tables: list[dict[str, str]] | None = None

    def _send(self, op: str, send, files=None, **fields) -> None:
        if not self.offline:
            try:
                send()
                return
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                self.offline = True
                warnings.warn(
                    f"dlharness: the tracking server does not answer ({type(exc).__name__}); "
                    f"training goes on and writes are spooled to {self.spool.folder}: "
                    f"replay them with `dlharness-sync {self.spool.folder}`",
                    SpoolWarning,
                    stacklevel=3,
                )
        self.spool.append(op, files, **fields)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        self._send(
            "log_batch",
            lambda: super(SpoolingClient, self).log_batch(run_id, metrics, params, tags),
            run_id=run_id,
            metrics=[[m.key, m.value, m.timestamp, m.step] for m in metrics],
            params=[[p.key, p.value] for p in params],
            tags=[[t.key, t.value] for t in tags],
        )

    def set_tag(self, run_id, key, value, synchronous=None) -> None:
        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_param(self, run_id, key, value, synchronous=None) -> Any:
        self.log_batch(run_id, params=[Param(key, str(value))])
        return value

    def log_artifact(self, run_id, local_path, artifact_path=None) -> None:
        name = Path(local_path).name
        self._send(
            "log_artifact",
            lambda: super(SpoolingClient, self).log_artifact(run_id, local_path, artifact_path),
            files={name: local_path},
            run_id=run_id,
            artifact_path=artifact_path,
        )

    def log_artifacts(self, run_id, local_dir, artifact_path=None) -> None:
        self._send(
            "log_artifacts",
            lambda: super(SpoolingClient, self).log_artifacts(run_id, local_dir, artifact_path),
            files={"dir": local_dir},
            run_id=run_id,
            artifact_path=artifact_path,
        )

    def log_table(self, run_id, data, artifact_file) -> None:
        """A table as MLflow's `log_table` writes a new one (pandas' split JSON, listed in the
        run's `mlflow.loggedArtifacts` tag), but a table logged again replaces the earlier one:
        MLflow's appends to it, so a resumed run's evaluation listed every test sample twice.
        Nothing is read but that tag, once (MLflow lists and downloads: ≈85 ms a table here)."""
        if self._tables is None:
            self._tables = self._logged_tables(run_id)
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        log_written_file(
            self,
            run_id,
            artifact_file,
            lambda path: frame.to_json(path, orient="split", index=False, date_format="iso"),
        )
        entry = {"path": artifact_file, "type": "table"}
        if entry not in self._tables:
            self._tables.append(entry)
            self.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(self._tables))

    def _logged_tables(self, run_id: str) -> list[dict[str, str]]:
        """The tables the run lists already (a resumed run's, a user's own); none offline."""
        if self.offline:
            return []
        try:
            tag = self.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]")
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            return []
        return json.loads(tag)

    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        self._send(
            "delete_artifacts",
            lambda: self._repository(run_id).delete_artifacts(artifact_path),
            run_id=run_id,
            artifact_path=artifact_path,
        )

    def log_inputs(self, run_id, datasets=None, models=None) -> None:
        datasets = list(datasets or [])
        self._send(
            "log_inputs",
            lambda: super(SpoolingClient, self).log_inputs(run_id, datasets=datasets),
            run_id=run_id,
            datasets=[
                base64.b64encode(d.to_proto().SerializeToString()).decode() for d in datasets
            ],
        )

    def set_terminated(self, run_id, status=None, end_time=None) -> None:
        end_time = end_time or int(time.time() * 1000)
        self._send(
            "set_terminated",
            lambda: super(SpoolingClient, self).set_terminated(run_id, status, end_time),
            run_id=run_id,
            status=status,
            end_time=end_time,
        )

    def spool_operation(self, op: str, files: dict[str, str | os.PathLike], **fields: Any) -> None:
        """An application's own operation, journalled in order for a `Replayer` of `op`."""
        self.offline = True
        self.spool.append(op, files, **fields)

    def _repository(self, run_id: str):
        if run_id not in self._repositories:
            uri = self.get_run(run_id).info.artifact_uri
            self._repositories[run_id] = get_artifact_repository(
                uri, tracking_uri=self.spool.meta["tracking_uri"]
            )
        return self._repositories[run_id]


# Replays an operation the application spooled itself: (tracking URI, spool, entry) → None.
Replayer = Callable[[str, "Spool", dict[str, Any]], None]


def replay(spool: Spool, tracking_uri: str, replayers: Mapping[str, Replayer] | None = None) -> int:
    """Send a spool's journal to the run, in order; return the number of operations.

    `replayers` replay the operations an application spooled itself (the harness's final
    model), by operation name.

    Safe to run again after a partial replay: it goes on after the last operation done
    (`replayed.json`), and metrics the run already holds (same key and step, as when a frozen
    server applied a write after the client gave up on it) are not sent twice.
    """
    client = MlflowClient(tracking_uri)
    seen: dict[str, set[int]] = {}
    progress = spool.folder / PROGRESS
    done = json.loads(progress.read_text())["seq"] if progress.exists() else 0
    count = 0
    for entry in spool.entries():
        if entry["seq"] <= done:  # replayed by an earlier, interrupted sync
            continue
        try:
            _replay_one(client, spool, entry, seen, tracking_uri, replayers or {})
        except Exception as exc:
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise ReplayError(
                f"replay stopped at entry {entry['seq']} ({entry['op']}): {first_line}; "
                "fix that and run it again (what was replayed is not sent twice)"
            ) from exc
        count += 1
        partial = progress.with_suffix(".partial")
        partial.write_text(json.dumps({"seq": entry["seq"]}))
        os.replace(partial, progress)
    (spool.folder / JOURNAL).rename(spool.folder / SYNCED)
    progress.unlink(missing_ok=True)
    return count


class ReplayError(Exception):
    """A spooled operation could not be replayed."""


def _replay_one(
    client: MlflowClient,
    spool: Spool,
    entry: dict[str, Any],
    seen: dict[str, set[int]],
    tracking_uri: str,
    replayers: Mapping[str, Replayer],
) -> None:
    op, run_id = entry["op"], entry.get("run_id")
    if op == "log_batch":
        metrics = []
        for key, value, timestamp, step in entry["metrics"]:
            if key not in seen:
                seen[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in seen[key]:
                metrics.append(Metric(key, value, timestamp, step))
                seen[key].add(step)
        params = [Param(k, v) for k, v in entry["params"]]
        tags = [RunTag(k, v) for k, v in entry["tags"]]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    elif op == "log_artifact":
        [name] = entry["files"]
        client.log_artifact(run_id, str(spool.file(entry, name)), entry["artifact_path"])
    elif op == "log_artifacts":
        client.log_artifacts(run_id, str(spool.file(entry, "dir")), entry["artifact_path"])
    elif op == "delete_artifacts":
        uri = client.get_run(run_id).info.artifact_uri
        repository = get_artifact_repository(uri, tracking_uri=tracking_uri)
        repository.delete_artifacts(entry["artifact_path"])
    elif op == "log_inputs":
        datasets = [
            DatasetInput.from_proto(ProtoDatasetInput.FromString(base64.b64decode(blob)))
            for blob in entry["datasets"]
        ]
        client.log_inputs(run_id, datasets=datasets)
    elif op in replayers:
        replayers[op](tracking_uri, spool, entry)
    elif op == "set_terminated":
        client.set_terminated(run_id, entry["status"], entry["end_time"])
    else:
        raise ValueError(f"unknown spooled operation {op!r}")

"""Tracking outages: what cannot reach the tracking server is kept on disk, in order, and sent
to the run as soon as the server answers again.

From the first write that fails because the server does not answer, every later write of the
run in this process goes to the spool at once (no request waits on a server known to be down),
so the replay keeps the order in which things happened. Meanwhile a thread asks the server's
health with back-off; once it answers, the spool is replayed in order and writes go straight to
the server again. What is still spooled when the process ends, `dlharness-sync` replays. A
spool is one folder per run: `meta.json` (run id, tracking URI), `journal.jsonl` (one operation
a line, flushed and fsynced as written) and `files/` (the artifacts, copied).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
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

from dlharness.errors import first_line
from dlharness.tracking.artifact_file import log_written_file
from dlharness.tracking.params import log_params_once, set_missing_tags

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
SYNCED = "journal.synced.jsonl"
PROGRESS = "replayed.json"
# MLflow's HTTP client settings while dlharness sends, where the user set none: a request waits
# 5 s for an answer and is tried once more at once (plus MLflow's jitter, up to 1 s), so a
# server that hangs stalls tracking ≈11 s before the spool takes over. MLflow's defaults (120 s,
# 7 retries with back-off) would stall it for minutes per request.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
# Seconds between health probes of a server that does not answer: doubling from the first to
# the longest, each probe waiting at most PROBE_TIMEOUT_S.
PROBE_FIRST_S = 0.5
PROBE_LONGEST_S = 8.0
PROBE_TIMEOUT_S = 2.0
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


class ServerSilentError(ConnectionError):
    """A read asked of a server that this process already knows does not answer."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server could not be reached (not that it refused)."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ServerSilentError)):
        return True
    text = f"{exc} {exc.__cause__ or ''}"
    return any(sign in text for sign in UNREACHABLE_SIGNS)


class _HttpDefaults:
    """`HTTP_DEFAULTS` in the environment while any thread is inside, then as they were.

    MLflow reads its HTTP settings from the environment at each request and has no setting per
    client; the library leaves the user's process as it found it once no dlharness call runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: dict[str, str | None] = {}

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._saved = {key: os.environ.get(key) for key in HTTP_DEFAULTS}
                for key, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(key, value)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    for key, value in self._saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value


http_defaults = _HttpDefaults()

# Replays an operation the application spooled itself: (tracking URI, spool, entry) → None.
Replayer = Callable[[str, "Spool", dict[str, Any]], None]
# Writes that read the run first (what it holds decides what is written), journalled whole and
# replayed by reading it then: name → write(client, run id, values).
READ_THEN_WRITE: dict[str, Callable[[MlflowClient, str, Mapping[str, str]], None]] = {
    "log_params_once": log_params_once,
    "set_missing_tags": set_missing_tags,
}


class Spool:
    """The append-only journal of one run's unsent writes, and whether they wait.

    `offline` is shared by every client of the run in this process: once one request found the
    server silent, all writes queue here until a probe finds it answering and the journal has
    been replayed.
    """

    _open: ClassVar[dict[Path, Spool]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, folder: Path, meta: dict[str, str]) -> None:
        self.folder = folder
        self.meta = meta
        self.offline = False
        # Replayers of the application's own operations, by name (the harness's final model).
        self.replayers: dict[str, Replayer] = {}
        self._lock = threading.RLock()
        self._replay_lock = threading.Lock()
        self._count = max((entry["seq"] for entry in self.entries()), default=0)
        self._users = 0
        self._prober: threading.Thread | None = None
        self._closing = threading.Event()

    @classmethod
    def for_run(cls, root: str | os.PathLike, run_id: str, tracking_uri: str) -> Spool:
        """The one Spool object of this run in this process (threads share its order).

        Nothing is written until the first operation is spooled. A journal an earlier process
        left is taken up: later writes queue behind it until it is replayed.
        """
        folder = Path(root).resolve() / run_id
        with cls._open_lock:
            if folder not in cls._open:
                spool = cls(folder, {"run_id": run_id, "tracking_uri": tracking_uri})
                cls._open[folder] = spool
                if spool.pending:
                    spool._go_offline()
            return cls._open[folder]

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        run_id: str,
        tracking_uri: str,
        replayers: Mapping[str, Replayer] | None = None,
    ) -> Spool:
        """`for_run`, held until `close`: the probing stops when its last holder closes it."""
        spool = cls.for_run(root, run_id, tracking_uri)
        with spool._lock:
            spool._users += 1
            spool.replayers.update(replayers or {})
        return spool

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
    def shared(self) -> bool:
        """Whether another holder (the harness around a fit) still has it open."""
        return self._users > 1

    @classmethod
    def waiting_in(cls, root: str | os.PathLike, run_id: str) -> int:
        """How many of run `run_id`'s writes wait in its spool folder under `root`."""
        folder = Path(root).resolve() / run_id
        return cls.load(folder).waiting() if (folder / JOURNAL).exists() else 0

    def waiting(self) -> int:
        """How many spooled writes the run has not received yet."""
        return len(self.unreplayed())

    def unreplayed(self) -> list[dict[str, Any]]:
        """The journal's entries after the last one replayed (`replayed.json`), in order."""
        done = self._replayed_seq()
        return [entry for entry in self.entries() if entry["seq"] > done]

    def append(self, op: str, files: dict[str, str | os.PathLike] | None = None, **fields) -> None:
        """Journal one operation; `files` (name → local path) are copied in first."""
        with self._lock:
            if not self.pending:
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

    def queue(self, op: str, files: dict[str, str | os.PathLike] | None = None, **fields) -> None:
        """Journal the operation and queue every later write behind it (it is sent, in order,
        once the server answers)."""
        with self._lock:
            self._go_offline()
            self.append(op, files, **fields)

    def append_if_offline(
        self, op: str, files: dict[str, str | os.PathLike] | None = None, **fields
    ) -> bool:
        """Journal the operation if writes are queueing (as one step: the replay cannot switch
        back to sending in between); False if it is to be sent."""
        with self._lock:
            if not self.offline:
                return False
            self.append(op, files, **fields)
            return True

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

    # Going offline, and back

    def went_offline(self, exc: BaseException) -> None:
        """A request found the server silent: queue every write from now on, and probe."""
        with self._lock:
            if self.offline:
                return
            self._go_offline()
        warnings.warn(
            f"dlharness: the tracking server does not answer ({type(exc).__name__}); training "
            f"goes on and writes wait in {self.folder}, sent as soon as it answers again",
            SpoolWarning,
            stacklevel=4,
        )

    def _go_offline(self) -> None:
        with self._lock:
            self.offline = True
            if self._prober is None and not self._closing.is_set():
                self._prober = threading.Thread(
                    target=self._probe, name="dlharness-spool-probe", daemon=True
                )
                self._prober.start()

    def settle(self) -> bool:
        """Where writes wait, probe the server once now and, if it answers, replay them all
        before returning (the end of a run is sent after everything before it). True when
        nothing waits."""
        if not self.offline:
            return True
        # On a thread of its own, as the prober's replays: the caller's thread may hold an
        # active MLflow run, which a replayed model logging would have to open again.
        attempt = threading.Thread(target=self._try_once, name="dlharness-spool-settle")
        attempt.start()
        attempt.join()
        return not self.offline

    def close(self) -> int:
        """Release what `open` took; the last holder stops the probing. Returns how many writes
        still wait for `dlharness-sync`."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0
            prober = self._prober
            if last:
                self._closing.set()
        if not last:
            return 0
        if prober is not None:
            prober.join()
        with self._open_lock:
            if self._open.get(self.folder) is self:
                del self._open[self.folder]
        return self.waiting()

    def _probe(self) -> None:
        delay = PROBE_FIRST_S
        while not self._closing.wait(delay):
            if self._try_once():
                return
            delay = min(delay * 2, PROBE_LONGEST_S)
        with self._lock:
            self._prober = None

    def _try_once(self) -> bool:
        """Probe the server; if it answers, replay the journal. True once nothing waits."""
        if not self.offline:
            return True
        return self._answers() and self._catch_up()

    def _answers(self) -> bool:
        uri = self.meta["tracking_uri"]
        try:
            if uri.startswith(("http://", "https://")):
                health = requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
                return health.status_code == 200
            with http_defaults():
                MlflowClient(uri).search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _catch_up(self) -> bool:
        """Replay what waits, then send directly again; False if the server went silent again
        or an operation cannot be replayed in this process (it stays for `dlharness-sync`)."""
        uri = self.meta["tracking_uri"]
        with self._replay_lock, http_defaults():
            client = MlflowClient(uri)
            seen: dict[str, set[int]] = {}
            sent = 0
            while True:
                with self._lock:
                    todo = self.unreplayed()
                    if not todo:
                        self._archive()
                        self.offline = False
                        self._prober = None
                        break
                for entry in todo:
                    if not self._replay_live(client, entry, seen, uri):
                        return False
                    sent += 1
        if sent:
            log.warning(
                "dlharness: the tracking server answers again; %d spooled writes sent to run %s",
                sent,
                self.run_id,
            )
        return True

    def _replay_live(
        self, client: MlflowClient, entry: dict[str, Any], seen: dict[str, set[int]], uri: str
    ) -> bool:
        try:
            _replay_one(client, self, entry, seen, uri, self.replayers)
        except UnknownOperationError:
            log.warning(
                "dlharness: spooled %s (entry %d) of run %s is replayed by `dlharness-sync %s`",
                entry["op"], entry["seq"], self.run_id, self.folder,
            )  # fmt: skip
            return False
        except Exception as exc:
            if is_unreachable(exc):
                return False
            # Refused by the server (a 4xx): sending it again would be refused again.
            log.warning(
                "dlharness: the tracking server refused spooled %s (entry %d) of run %s, "
                "skipped: %s",
                entry["op"], entry["seq"], self.run_id, first_line(exc),
            )  # fmt: skip
        self._mark_replayed(entry["seq"])
        return True

    # Replay bookkeeping

    def _replayed_seq(self) -> int:
        progress = self.folder / PROGRESS
        return json.loads(progress.read_text())["seq"] if progress.exists() else 0

    def _mark_replayed(self, seq: int) -> None:
        progress = self.folder / PROGRESS
        partial = progress.with_suffix(".partial")
        partial.write_text(json.dumps({"seq": seq}))
        os.replace(partial, progress)

    def _archive(self) -> None:
        """The replayed journal joins `SYNCED`; its copied files go."""
        with self._lock:
            journal = self.folder / JOURNAL
            if not journal.exists():
                return
            with open(self.folder / SYNCED, "a", encoding="utf-8") as synced:
                synced.write(journal.read_text(encoding="utf-8"))
            journal.unlink()
            (self.folder / PROGRESS).unlink(missing_ok=True)
            shutil.rmtree(self.folder / "files", ignore_errors=True)


class SpoolingClient(MlflowClient):
    """MlflowClient whose writes go to the run's `Spool` while the tracking server does not
    answer, and straight to the server otherwise.

    MLflow's higher-level helpers (`log_text`, `log_dict`, `log_table`, `log_figure`,
    `log_image`) end in `log_artifact` and `set_tag`, so overriding the primitive writes covers
    them all. Writes that read the run first (`log_params_once`, `set_missing_tags`) are spooled
    whole and read it when replayed. Reads are not spooled: while the server is known not to
    answer they fail at once with `ServerSilentError`.
    """

    def __init__(self, tracking_uri: str, spool_root: str | os.PathLike, run_id: str) -> None:
        super().__init__(tracking_uri)
        self.spool = Spool.for_run(spool_root, run_id, tracking_uri)
        self._repositories: dict[str, Any] = {}
        # The tables the run lists in MLflow's `mlflow.loggedArtifacts` tag, read at the first.
        self._tables: list[dict[str, str]] | None = None

    @property
    def offline(self) -> bool:
        """Whether writes are queueing in the spool (the server did not answer)."""
        return self.spool.offline

    def settle(self) -> bool:
        """See `Spool.settle`."""
        return self.spool.settle()

    def _send(self, op: str, send, files=None, **fields) -> None:
        if self.spool.append_if_offline(op, files, **fields):
            return
        try:
            with http_defaults():
                send()
            return
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self.spool.went_offline(exc)
        self.spool.append(op, files, **fields)

    def request(self, call: Callable[[], Any]) -> Any:
        """``call()``, a request of calls this client does not spool (a LoggedModel's): it
        fails at once while the server is known silent, and marks it silent when unanswered."""
        return self._read(call)

    def _read(self, read: Callable[[], Any]) -> Any:
        if self.spool.offline:
            raise ServerSilentError(
                f"the tracking server did not answer; writes wait in {self.spool.folder}"
            )
        try:
            with http_defaults():
                return read()
        except Exception as exc:
            if is_unreachable(exc):
                self.spool.went_offline(exc)
            raise

    def get_run(self, run_id):
        return self._read(lambda: super(SpoolingClient, self).get_run(run_id))

    def get_metric_history(self, run_id, key):
        return self._read(lambda: super(SpoolingClient, self).get_metric_history(run_id, key))

    def list_artifacts(self, run_id, path=None):
        return self._read(lambda: super(SpoolingClient, self).list_artifacts(run_id, path))

    def download_artifacts(self, run_id, path, dst_path=None):
        return self._read(
            lambda: super(SpoolingClient, self).download_artifacts(run_id, path, dst_path)
        )

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

    def log_params_once(self, run_id: str, params: Mapping[str, str]) -> None:
        """`params.log_params_once` through this client."""
        self._read_then_write("log_params_once", run_id, params)

    def set_missing_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """`params.set_missing_tags` through this client."""
        self._read_then_write("set_missing_tags", run_id, tags)

    def _read_then_write(self, op: str, run_id: str, values: Mapping[str, str]) -> None:
        """A write that reads the run first, journalled whole when the run cannot be read."""
        values = dict(values)
        write = READ_THEN_WRITE[op]
        self._send(op, lambda: write(self, run_id, values), run_id=run_id, values=values)

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
        Nothing is read but that tag, once (MLflow lists and downloads every table)."""
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

    def spool_operation(
        self, op: str, files: dict[str, str | os.PathLike], replayer: Replayer, **fields: Any
    ) -> None:
        """An application's own operation, journalled in order and replayed by `replayer` (in
        this process once the server answers, else by `dlharness-sync` given the same one)."""
        self.spool.replayers[op] = replayer
        self.spool.queue(op, files, **fields)

    def _repository(self, run_id: str):
        if run_id not in self._repositories:
            uri = self.get_run(run_id).info.artifact_uri
            self._repositories[run_id] = get_artifact_repository(
                uri, tracking_uri=self.spool.meta["tracking_uri"]
            )
        return self._repositories[run_id]


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
    count = 0
    # After the last entry an earlier, interrupted replay got to.
    for entry in spool.unreplayed():
        try:
            _replay_one(client, spool, entry, seen, tracking_uri, replayers or {})
        except Exception as exc:
            raise ReplayError(
                f"replay stopped at entry {entry['seq']} ({entry['op']}): {first_line(exc)}; "
                "fix that and run it again (what was replayed is not sent twice)"
            ) from exc
        count += 1
        spool._mark_replayed(entry["seq"])
    spool._archive()
    return count


class ReplayError(Exception):
    """A spooled operation could not be replayed."""


class UnknownOperationError(ValueError):
    """A spooled operation that no replayer given here knows."""


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
    elif op in READ_THEN_WRITE:
        READ_THEN_WRITE[op](client, run_id, entry["values"])
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
        raise UnknownOperationError(f"unknown spooled operation {op!r}")

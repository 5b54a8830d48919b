"""`dlharness-reproduce RUN_ID`: the run again, from the exact data and commit it recorded.

The run's git commit is checked out in a git worktree, the data version is restored by its
DVC hash (from the DVC cache, else pulled from the remote) with DVC's own CLI, DVC hashes it
again, and the run's logged config trains a new run tagged with the one it reproduces.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlharness.data.data_version import (
    TAG_GIT_COMMIT,
    TAG_MD5,
    TAG_MODIFIED,
    TAG_SUBDIR,
    data_version,
    dvc_root_of,
)
from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.tracking.epoch_history import SYSTEM_PREFIX
from dlharness.tracking.store_access import existing_store
from dlharness.training.config import TrainConfig, from_dict, set_dotted, validate
from dlharness.training.output import plain_training_output
from dlharness.training.resume import logged_config

if TYPE_CHECKING:
    from dlharness.training.train import TrainResult

TAG_REPRODUCES = "dlharness.reproduces"
# Inside the worktree: the data version as a one-output `.dvc` file, and where it lands. Apart
# from the pipeline's own outputs, so that DVC sees no two stages writing one path.
RESTORE_FOLDER = ".dlharness-reproduce"
RESTORED_DATA = "data"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-reproduce",
        description="Train a logged run again on the data version and git commit it recorded "
        "(its data read from a DVC-tracked folder), with its logged config.",
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the run to reproduce")
    parser.add_argument(
        "--dir",
        default=None,
        help="where the git worktree goes, kept afterwards (default: a temporary folder)",
    )
    parser.add_argument(
        "--repo",
        default=".",
        help="a folder of the DVC repository that holds the run's commit (default: .)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the run's store, where the new run goes too "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def recorded_version(client: MlflowClient, run_id: str) -> tuple[str, str, str]:
    """The run's (DVC hash, sub-folder, git commit); a run without one is a `UsageError`."""
    try:
        tags = client.get_run(run_id).data.tags
    except MlflowException:
        raise UsageError(f"no run {run_id} in this store") from None
    md5, commit = tags.get(TAG_MD5), tags.get(TAG_GIT_COMMIT)
    if md5 is None:
        raise UsageError(
            f"run {run_id} records no DVC data version (its data was not a DVC-tracked folder)"
        )
    if tags.get(TAG_MODIFIED) == "true":
        raise UsageError(
            f"run {run_id} read a folder that differed from its DVC version {md5}: "
            "the data it trained on was never versioned"
        )
    if commit is None:
        raise UsageError(f"run {run_id} records no git commit of its DVC repository")
    return md5, tags.get(TAG_SUBDIR, ""), commit


@contextlib.contextmanager
def worktree(repo_root: Path, commit: str, directory: Path | None) -> Iterator[Path]:
    """`commit` checked out in a git worktree; a temporary one is removed afterwards."""
    if _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=repo_root).returncode != 0:
        raise UsageError(f"commit {commit} is not in the git repository at {repo_root}")
    scratch = None
    if directory is None:
        scratch = Path(tempfile.mkdtemp(prefix="dlharness-reproduce-"))
        directory = scratch / "worktree"
    elif directory.exists() and any(directory.iterdir()):
        raise UsageError(f"--dir {directory} exists and is not empty")
    added = _git("worktree", "add", "--detach", str(directory), commit, cwd=repo_root)
    if added.returncode != 0:
        raise UsageError(f"git worktree add {directory}: {_last_line(added.stderr)}")
    try:
        yield directory
    finally:
        if scratch is not None:
            _git("worktree", "remove", "--force", str(directory), cwd=repo_root)
            shutil.rmtree(scratch, ignore_errors=True)


def restore_data(tree: Path, md5: str, cache_dir: str) -> Path:
    """The data version `md5` in `tree`, from the shared DVC cache or else the remote."""
    if not (tree / ".dvc").is_dir():
        raise UsageError(f"the run's commit has no DVC repository at {tree}")
    folder = tree / RESTORE_FOLDER
    folder.mkdir(exist_ok=True)
    target = folder / f"{RESTORED_DATA}.dvc"
    target.write_text(
        yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": RESTORED_DATA}]})
    )
    # The worktree has no cache of its own (it is not committed): it shares the repository's.
    _dvc("config", "--local", "cache.dir", cache_dir, cwd=tree)
    relative = str(target.relative_to(tree))
    if _dvc("checkout", relative, cwd=tree).returncode != 0:
        pulled = _dvc("pull", relative, cwd=tree)
        if pulled.returncode != 0:
            raise UsageError(
                f"data version {md5} is neither in the DVC cache nor on the remote "
                f"({_last_line(pulled.stderr)})"
            )
    restored = folder / RESTORED_DATA
    version = data_version(restored)
    if version is None or version.md5 != md5 or version.modified:
        raise UsageError(f"the restored data in {restored} does not hash to {md5}")
    return restored


def _cache_dir(repo_root: Path) -> str:
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        return repo.cache.local_cache_dir


def first_difference(client: MlflowClient, original: str, copy: str) -> str | None:
    """The first per-epoch value that differs between two runs, None if every one is equal."""
    metrics = client.get_run(original).data.metrics
    for key in sorted(metrics):
        if key.startswith(SYSTEM_PREFIX):
            continue
        before = {m.step: m.value for m in client.get_metric_history(original, key)}
        after = {m.step: m.value for m in client.get_metric_history(copy, key)}
        for step, value in sorted(before.items()):
            # Bit for bit, NaN included: the shortest repr round-trips a float exactly.
            if repr(after.get(step)) != repr(value):
                return f"{key} at step {step}: {value!r} then {after.get(step)!r}"
    return None


def reproduce(
    run_id: str, tracking_uri: str, repo: Path, directory: Path | None
) -> TrainResult | None:
    """Train `run_id` again; return the new run's `TrainResult`."""
    client = MlflowClient(tracking_uri)
    md5, subdir, commit = recorded_version(client, run_id)
    logged = logged_config(client, run_id)
    repo_root = dvc_root_of(repo.resolve())
    if repo_root is None:
        raise UsageError(f"{repo} is not in a DVC repository; pass --repo")
    with worktree(repo_root, commit, directory) as tree:
        data = restore_data(tree, md5, _cache_dir(repo_root))
        set_dotted(logged, "data.data_dir", str(data / subdir) if subdir else str(data))
        set_dotted(logged, "tracking.tracking_uri", tracking_uri)
        set_dotted(logged, "tracking.run_name", None)
        # A reproduction checks a result; it does not put a new version in the registry.
        set_dotted(logged, "tracking.register_model", None)
        tags = dict(logged.get("tracking", {}).get("tags") or {})
        set_dotted(logged, "tracking.tags", {**tags, TAG_REPRODUCES: run_id})
        cfg = from_dict(TrainConfig, logged)
        validate(cfg)
        # Imported here: --help and a refused run answer without loading torch.
        from dlharness.training.collector import freeze_long_lived_objects
        from dlharness.training.train import train

        freeze_long_lived_objects()
        return train(cfg, fast_package_index=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_training_output()
    try:
        uri = existing_store(args.tracking_uri)
        directory = Path(args.dir).resolve() if args.dir else None
        result = reproduce(args.run_id, uri, Path(args.repo), directory)
    except UsageError as exc:
        print(f"dlharness-reproduce: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dlharness-reproduce: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    assert result is not None  # one process: the leader, which returns the result
    difference = first_difference(MlflowClient(uri), args.run_id, result.run_id)
    verdict = "every per-epoch metric equal" if difference is None else f"differs: {difference}"
    print(f"run {result.run_id} reproduces {args.run_id}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

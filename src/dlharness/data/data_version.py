"""The DVC version of a run's data folder, and of the `dvc exp run` that started it, as tags.

DVC answers every question here through its own `Repo`: which tracked output holds the folder
(a stage output in `dvc.lock` or a `.dvc` file), the hash it recorded, whether the folder still
matches it, and the git commit. Outside a DVC repository nothing is imported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# What a run records about its DVC-tracked data folder.
TAG_MD5 = "dvc.data.md5"
TAG_PATH = "dvc.data.path"
TAG_SUBDIR = "dvc.data.subdir"
TAG_DEFINED_IN = "dvc.data.defined_in"
TAG_MODIFIED = "dvc.data.modified"
TAG_GIT_COMMIT = "dvc.data.git_commit"
TAG_REPO = "dvc.repo"
# Set by `dvc exp run` in the environment of the stage it runs.
EXPERIMENT_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}


@dataclass(frozen=True)
class DataVersion:
    """A data folder's place in a DVC repository.

    Attributes:
        repo_root: The DVC repository's root folder.
        path: The tracked output that holds the folder, relative to `repo_root`.
        subdir: Where the folder sits inside that output ("" when it is the output itself).
        md5: The output's hash as DVC recorded it (a folder's ends in ".dir").
        defined_in: The file that records it: "dvc.lock" (a stage output) or a `.dvc` file.
        modified: Whether the folder's content differs from the recorded hash.
        git_commit: The repository's HEAD commit, None before the first commit.
    """

    repo_root: Path
    path: str
    subdir: str
    md5: str
    defined_in: str
    modified: bool
    git_commit: str | None

    def tags(self) -> dict[str, str]:
        tags = {
            TAG_MD5: self.md5,
            TAG_PATH: self.path,
            TAG_DEFINED_IN: self.defined_in,
            TAG_MODIFIED: str(self.modified).lower(),
            TAG_REPO: str(self.repo_root),
        }
        if self.subdir:
            tags[TAG_SUBDIR] = self.subdir
        if self.git_commit:
            tags[TAG_GIT_COMMIT] = self.git_commit
        return tags


class DataVersionWarning(UserWarning):
    """The data lives in a DVC repository, but its version could not be read."""


def dvc_root_of(folder: Path) -> Path | None:
    """The nearest folder at or above `folder` holding a `.dvc` directory."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return None


def data_version(folder: str | os.PathLike) -> DataVersion | None:
    """The DVC version of `folder`, or None when it is not inside a DVC-tracked output.

    Warns (`DataVersionWarning`) instead of failing when DVC is missing or cannot read the
    repository: a run without the tags is better than no run.
    """
    folder = Path(folder).resolve()
    root = dvc_root_of(folder)
    if root is None:
        return None
    try:
        from dvc.exceptions import OutputNotFoundError
        from dvc.repo import Repo
    except ImportError:
        warnings.warn(
            f"{folder} is in the DVC repository {root}, but dvc is not installed here: "
            "the run records no data version (pip install 'dlharness[dvc]')",
            DataVersionWarning,
            stacklevel=2,
        )
        return None
    try:
        with Repo(str(root)) as repo:
            try:
                # Not strict: the output may be a parent of the folder read.
                (out,) = repo.find_outs_by_path(str(folder), strict=False)
            except OutputNotFoundError:
                return None
            recorded = out.hash_info.value
            if recorded is None:  # declared in dvc.yaml, never produced
                return None
            output_path = Path(out.fs_path)
            stage_file = Path(out.stage.path)
            if not out.stage.is_data_source:  # a pipeline stage: its hashes are in the lock
                stage_file = stage_file.with_name("dvc.lock")
            return DataVersion(
                repo_root=root,
                path=output_path.relative_to(root).as_posix(),
                subdir="" if folder == output_path else folder.relative_to(output_path).as_posix(),
                md5=recorded,
                defined_in=stage_file.relative_to(root).as_posix(),
                # DVC hashes the folder (cached by file mtime and inode in its state database).
                modified=out.get_hash().value != recorded,
                git_commit=_head_commit(repo),
            )
    except Exception as exc:
        warnings.warn(
            f"could not read the DVC version of {folder}: {exc}", DataVersionWarning, stacklevel=2
        )
        return None


def _head_commit(repo) -> str | None:
    from dvc.scm import SCMError as NoGitError
    from scmrepo.exceptions import SCMError

    try:
        return repo.scm.get_rev()
    except (SCMError, NoGitError):  # an empty git repository, or DVC initialised with --no-scm
        return None


def experiment_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The `dvc exp run` that started this process, if one did."""
    return {tag: environ[name] for name, tag in EXPERIMENT_TAGS.items() if environ.get(name)}

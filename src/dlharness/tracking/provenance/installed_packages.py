"""What is installed, cached per Python environment: the run's requirements.txt and MLflow's
package index.

Both read every installed distribution's metadata (the index stats every file: over a second
on a few hundred packages) and both change only when packages are installed, upgraded or
removed. They are cached on disk under a key made of the distribution folders on `sys.path`
and their modification times (a thousandth of the index's cost), one file per environment
and kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "DLHARNESS_CACHE_DIR"
# The child uses the parent's sys.path, so that it indexes what the parent would.
_INDEX_SCRIPT = (
    "import os, json, sys; os.nice(19); sys.path[:] = json.loads(sys.argv[1]); "
    "import importlib_metadata; "
    "json.dump(importlib_metadata.packages_distributions(), sys.stdout)"
)
_METADATA_SUFFIXES = (".dist-info", ".egg-info")

Index = dict[str, list[str]]


def cache_dir() -> Path:
    """``$DLHARNESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/dlharness`` (``~/.cache/dlharness``)."""
    if explicit := os.environ.get(CACHE_DIR_ENV):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlharness"


def environment_key(paths: Sequence[str]) -> str:
    """Changes whenever a distribution on `paths` is installed, upgraded or removed: the name
    and modification time of every metadata folder (one stat call per package)."""
    digest = hashlib.sha256()
    for entry in paths:
        digest.update(f"{entry}\0".encode())
        try:
            with os.scandir(entry or ".") as listing:
                found = sorted(
                    (item.name, item.stat().st_mtime_ns)
                    for item in listing
                    if item.name.endswith(_METADATA_SUFFIXES)
                )
        except OSError:
            continue
        for name, mtime_ns in found:
            digest.update(f"{name}\0{mtime_ns}\0".encode())
    return digest.hexdigest()


def _cache_file(kind: str) -> Path:
    prefix = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-{prefix}.json"


def read_cached(kind: str, key: str) -> Any:
    """What `write_cached` stored for `kind` under `key`, or None."""
    try:
        stored = json.loads(_cache_file(kind).read_text())
    except (OSError, ValueError):
        return None
    return stored.get("value") if isinstance(stored, dict) and stored.get("key") == key else None


def write_cached(kind: str, key: str, value: Any) -> None:
    """Best effort: a cache that cannot be written only means the next run rebuilds it."""
    final = _cache_file(kind)
    # Written whole then renamed: a concurrent run reads the old file or the new one.
    partial = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "value": value}))
        os.replace(partial, final)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def installed_requirements() -> str:
    """Every installed distribution as `name==version`, sorted: the run's requirements.txt."""
    key = environment_key(sys.path)
    cached = read_cached("requirements", key)
    if isinstance(cached, str):
        return cached
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins[name.lower()] = f"{name}=={dist.version}"
    text = "\n".join(pins[key] for key in sorted(pins)) + "\n"
    write_cached("requirements", key, text)
    return text


def _unbuilt_index_hooks() -> tuple[Callable[[], None], Any] | None:
    """MLflow's package-index builder and the metadata module it reads, or None when there is
    nothing to hand over: the index is built already (an earlier model log in this process),
    or this MLflow lacks the private names (it then builds its index as before)."""
    from mlflow.utils import requirements_utils

    build = getattr(requirements_utils, "_init_modules_to_packages_map", None)
    metadata = getattr(requirements_utils, "importlib_metadata", None)
    built = getattr(requirements_utils, "_MODULES_TO_PACKAGES", True) is not None
    return None if build is None or metadata is None or built else (build, metadata)


def _valid(index: Any) -> bool:
    return isinstance(index, dict) and all(
        isinstance(module, str) and isinstance(names, list) for module, names in index.items()
    )


class PackageIndex:
    """Hands MLflow its package index (`importlib_metadata.packages_distributions`, which it
    builds on the first model log of a process to check pinned requirements) from the cache.

    On a miss a child process at the lowest priority builds it while training runs (on a
    thread it would hold the interpreter lock and cost the epochs as much), and `install`
    caches its answer. Nothing happens when MLflow has its index already. Any failure (a child
    that fails or takes over 30 s, MLflow without the private names) only means that MLflow
    builds the index itself, as it would anyway.
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._index: Index | None = None
        if _unbuilt_index_hooks() is None:
            return
        self._key = environment_key(sys.path)
        cached = read_cached("package-index", self._key)
        self._index = cached if _valid(cached) else None
        if self._index is None:
            self._child = subprocess.Popen(
                [sys.executable, "-c", _INDEX_SCRIPT, json.dumps(sys.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )

    @property
    def cached(self) -> bool:
        """Whether the index came from the cache (no child process was started)."""
        return self._index is not None and self._child is None

    def install(self) -> None:
        index = self._index if self._index is not None else self._from_child()
        hooks = _unbuilt_index_hooks()
        if index is None or hooks is None:
            return
        build, mlflow_metadata = hooks
        original = mlflow_metadata.packages_distributions
        # MLflow mutates what it gets (adds its own module names): hand it a copy.
        mlflow_metadata.packages_distributions = lambda: {k: list(v) for k, v in index.items()}
        try:
            build()
        finally:
            mlflow_metadata.packages_distributions = original

    def close(self) -> None:
        if self._child is None:
            return
        if self._child.poll() is None:
            self._child.kill()
        self._child.communicate()

    def _from_child(self) -> Index | None:
        if self._child is None:
            return None
        try:
            # 30 s: an index this slow to build would be as slow for MLflow itself.
            out, _ = self._child.communicate(timeout=30)
            index = json.loads(out) if self._child.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            self.close()
            return None
        if not _valid(index):
            return None
        self._index = index
        write_cached("package-index", self._key, index)
        return index

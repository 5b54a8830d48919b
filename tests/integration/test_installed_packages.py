"""What is installed, cached per environment: MLflow's package index (handed over from the
cache or a child process) and the run's requirements.txt, rebuilt when packages change."""

from __future__ import annotations

import shutil
from importlib import metadata

import importlib_metadata
import pytest
from mlflow.utils import requirements_utils

from dlharness.tracking.provenance.installed_packages import (
    CACHE_DIR_ENV,
    PackageIndex,
    environment_key,
    installed_requirements,
)


@pytest.fixture
def unbuilt(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """MLflow as at the start of a process (no package index yet), and an empty cache."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)


def handed_over() -> tuple[PackageIndex, dict[str, list[str]]]:
    """A fresh PackageIndex installed into MLflow (as `train` does), and MLflow's index."""
    requirements_utils._MODULES_TO_PACKAGES = None
    index = PackageIndex()
    try:
        index.install()
    finally:
        index.close()
    built = requirements_utils._MODULES_TO_PACKAGES
    assert built is not None
    return index, {module: sorted(names) for module, names in built.items()}


def add_distribution(folder, name: str, module: str) -> None:
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{module}\n")


def test_index_is_mlflows_own_and_the_next_process_reads_it_from_the_cache(unbuilt):
    first, from_child = handed_over()
    second, from_cache = handed_over()
    assert (first.cached, second.cached) == (False, True)
    assert from_cache == from_child

    requirements_utils._MODULES_TO_PACKAGES = None
    requirements_utils._init_modules_to_packages_map()
    own = {m: sorted(n) for m, n in requirements_utils._MODULES_TO_PACKAGES.items()}
    assert from_cache == own
    assert from_cache["torch"] == ["torch"]
    assert "mlflow" in from_cache["mlflow"]


def test_installing_a_package_updates_the_index_and_the_requirements(
    unbuilt, tmp_path, monkeypatch
):
    handed_over()
    before = installed_requirements()
    assert f"torch=={metadata.version('torch')}" in before.splitlines()
    assert installed_requirements() == before  # from the cache

    site = tmp_path / "site"
    add_distribution(site, "tiny-thing", "tiny_thing")
    monkeypatch.syspath_prepend(str(site))
    assert importlib_metadata.packages_distributions()["tiny_thing"] == ["tiny-thing"]
    after, index = handed_over()
    assert not after.cached
    assert index["tiny_thing"] == ["tiny-thing"]
    assert set(installed_requirements().splitlines()) == {*before.splitlines(), "tiny-thing==1.0"}


def test_environment_key_follows_installs_upgrades_and_removals(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "plain_module.py").write_text("")
    empty = environment_key([str(site)])
    add_distribution(site, "tiny-thing", "tiny_thing")
    installed = environment_key([str(site)])
    (site / "tiny-thing-1.0.dist-info").rename(site / "tiny-thing-2.0.dist-info")
    upgraded = environment_key([str(site)])
    assert len({empty, installed, upgraded}) == 3
    (site / "another_module.py").write_text("")
    assert environment_key([str(site)]) == upgraded
    shutil.rmtree(site / "tiny-thing-2.0.dist-info")
    assert environment_key([str(site)]) == empty


def test_a_damaged_cache_is_rebuilt(unbuilt, tmp_path):
    handed_over()
    [cache_file] = (tmp_path / "cache").glob("package-index-*.json")
    cache_file.write_text('{"key": ')
    index, built = handed_over()
    assert not index.cached
    assert built["torch"] == ["torch"]
    assert handed_over()[0].cached

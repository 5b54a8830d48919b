"""MLflow's package index: handed over from a cache or a child process, rebuilt when the
installed packages change."""

from __future__ import annotations

import shutil

import importlib_metadata
import pytest
from mlflow.utils import requirements_utils

from dlharness.tracking.package_index import PackageIndex, environment_key


@pytest.fixture
def unbuilt(monkeypatch: pytest.MonkeyPatch):
    """MLflow as at the start of a process: no package index yet."""
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)


def handed_over(cache_file) -> tuple[PackageIndex, dict[str, list[str]]]:
    index = PackageIndex(cache_file)
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


def test_index_is_mlflows_own_and_the_next_process_reads_it_from_the_cache(
    tmp_path, unbuilt, monkeypatch
):
    cache_file = tmp_path / "packages.json"
    first, from_child = handed_over(cache_file)
    assert not first.cached and cache_file.is_file()

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    second, from_cache = handed_over(cache_file)
    assert second.cached
    assert from_cache == from_child

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    requirements_utils._init_modules_to_packages_map()
    own = {m: sorted(n) for m, n in requirements_utils._MODULES_TO_PACKAGES.items()}
    assert from_cache == own
    assert from_cache["torch"] == ["torch"]
    assert "mlflow" in from_cache["mlflow"]


def test_installing_a_package_rebuilds_the_cached_index(tmp_path, unbuilt, monkeypatch):
    cache_file = tmp_path / "packages.json"
    handed_over(cache_file)
    site = tmp_path / "site"
    add_distribution(site, "tiny-thing", "tiny_thing")
    monkeypatch.syspath_prepend(str(site))
    assert importlib_metadata.packages_distributions()["tiny_thing"] == ["tiny-thing"]

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    after, index = handed_over(cache_file)
    assert not after.cached
    assert index["tiny_thing"] == ["tiny-thing"]


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


def test_a_damaged_cache_is_rebuilt(tmp_path, unbuilt, monkeypatch):
    cache_file = tmp_path / "packages.json"
    cache_file.write_text('{"key": ')
    index, built = handed_over(cache_file)
    assert not index.cached
    assert built["torch"] == ["torch"]
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    assert handed_over(cache_file)[0].cached

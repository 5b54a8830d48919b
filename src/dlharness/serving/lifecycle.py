"""A registered model's lifecycle with aliases: promote only what is at least as good, keep
the previous holder reachable, roll back.

Aliases replace MLflow's deprecated stages: ``candidate`` (what a training registered),
``champion`` (what serves), ``previous`` (what served before). Every move is recorded on the
version it moved to, as ``deployment.*`` tags: who, when, from which alias, and why.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
TAG_PREFIX = "deployment."


class LifecycleError(Exception):
    """A move the registry's state does not allow (a missing alias, model or metric)."""


class WorseVersionError(Exception):
    """The version is worse than the alias's holder on the metric; `force` overrides."""


@dataclass(frozen=True)
class Move:
    """One alias moved: what now holds it, what held it before, and why."""

    name: str
    alias: str
    version: str
    replaced: str | None
    reason: str


def previous_alias(alias: str) -> str:
    """Where the holder of `alias` stays reachable after a move: ``previous`` for champion."""
    return PREVIOUS if alias == CHAMPION else f"{alias}-{PREVIOUS}"


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    """The lifecycle of the models in one registry (a tracking URI's)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client

    def aliases(self, name: str) -> dict[str, str]:
        """Alias → version of registered model `name`."""
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise LifecycleError(f"no registered model named {name!r}") from None
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def versions(self, name: str) -> list[ModelVersion]:
        self.aliases(name)  # a clear error for an unknown name
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted(found, key=lambda v: int(v.version))

    def metric(self, name: str, version: str, metric: str) -> float:
        """`metric` as the run that produced `version` logged it."""
        run_id = self.client.get_model_version(name, version).run_id
        if not run_id:
            raise LifecycleError(f"{name} version {version} has no run, so no {metric}")
        logged = self.client.get_run(run_id).data.metrics
        if metric not in logged:
            known = ", ".join(sorted(logged)) or "none"
            raise LifecycleError(
                f"{name} version {version}: its run {run_id} logged no {metric} (it has: {known})"
            )
        return logged[metric]

    def _holder(self, name: str, alias: str, aliases: dict[str, str]) -> str:
        if alias not in aliases:
            held = ", ".join(f"{a} → v{v}" for a, v in sorted(aliases.items())) or "none"
            raise LifecycleError(f"{name} has no alias {alias!r} (aliases: {held})")
        return aliases[alias]

    def _move(self, name: str, alias: str, version: str, source: str, reason: str) -> Move:
        replaced = self.aliases(name).get(alias)
        if replaced is not None and replaced != version:
            self.client.set_registered_model_alias(name, previous_alias(alias), replaced)
        self.client.set_registered_model_alias(name, alias, version)
        tags = {"alias": alias, "from": source, "at": _now(), "by": _who(), "reason": reason}
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, f"{TAG_PREFIX}{key}", value)
        return Move(name, alias, version, replaced, reason)

    def promote(
        self,
        name: str,
        source: str = CANDIDATE,
        target: str = CHAMPION,
        metric: str = "test/acc",
        lower_is_better: bool = False,
        force: bool = False,
        note: str | None = None,
    ) -> Move:
        """Point `target` at the version `source` points at, if it is at least as good.

        Raises:
            WorseVersionError: It is worse than `target`'s holder on `metric`, without `force`.
            LifecycleError: A missing model, alias or metric.
        """
        aliases = self.aliases(name)
        version = self._holder(name, source, aliases)
        value = self.metric(name, version, metric)
        holder = aliases.get(target)
        if holder == version:
            return Move(name, target, version, version, f"already {target}")
        if holder is None:
            reason = f"first {target}, {metric} {value:.4g}"
        else:
            held = self.metric(name, holder, metric)
            # NaN on either side compares False: refused.
            better_or_equal = value <= held if lower_is_better else value >= held
            comparison = f"{metric} {value:.4g} vs {held:.4g} of version {holder}"
            if better_or_equal:
                reason = comparison
            elif force:
                reason = f"forced, worse: {comparison}"
            else:
                raise WorseVersionError(
                    f"{name} version {version} ({source}) is worse than {target} "
                    f"version {holder}: {comparison}; not promoted (--force overrides)"
                )
        if note:
            reason = f"{reason}; {note}"
        return self._move(name, target, version, source, reason)

    def rollback(self, name: str, target: str = CHAMPION) -> Move:
        """Point `target` back at its previous holder; the holder it leaves becomes previous."""
        aliases = self.aliases(name)
        restored = self._holder(name, previous_alias(target), aliases)
        leaving = aliases.get(target)
        if restored == leaving:
            raise LifecycleError(
                f"{name}: {previous_alias(target)} is version {restored}, which holds {target}"
            )
        reason = f"rollback from version {leaving}" if leaving else f"rollback, no {target} held"
        move = self._move(name, target, restored, previous_alias(target), reason)
        if leaving is not None:
            self.client.set_model_version_tag(name, leaving, f"{TAG_PREFIX}rolled_back_at", _now())
            self.client.set_model_version_tag(name, leaving, f"{TAG_PREFIX}rolled_back_by", _who())
        return move

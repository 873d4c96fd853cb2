"""Small helpers for e2e tests: polling with a readable failure, binaries or skip, a running
cluster per module, a namespace per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tidal.devcluster import Binaries, ClusterOptions, DevClusterError, LocalCluster, find_binaries

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], what: str, timeout_s: float = 30.0, every_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def binaries_or_skip() -> Binaries:
    """The cached control-plane binaries; without them skip, unless TIDAL_E2E=require (CI)."""
    try:
        return find_binaries()
    except DevClusterError as error:
        if os.environ.get("TIDAL_E2E") == "require":
            raise
        pytest.skip(str(error))


def fresh_namespace(core: Any, prefix: str, drain_timeout_s: float = 60.0) -> Iterator[str]:
    """A fresh namespace for one test (use with ``yield from`` in a fixture). Pods of a deleted
    namespace go through KWOK's delete stage; waiting for them keeps the tests independent."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
    wait_for(lambda: not core.list_namespaced_pod(name).items, f"namespace {name} to drain",
             drain_timeout_s)  # fmt: skip


def running_cluster(
    workdir: Any,
    nodes: list[tuple[str, str]],
    priority_classes: dict[str, int] | None = None,
    **options: Any,
) -> Iterator[LocalCluster]:
    """A started local cluster with ``nodes`` (name, preset) ready and ``priority_classes``
    created, stopped afterwards (use with ``yield from`` in a module-scoped fixture)."""
    from kubernetes import client  # noqa: PLC0415

    local = LocalCluster(ClusterOptions(workdir=workdir, **options), binaries_or_skip())
    try:
        local.start()
        local.wait_nodes_ready(local.add_gpu_nodes(nodes))
        scheduling = client.SchedulingV1Api(local.api_client())
        for name, value in (priority_classes or {}).items():
            body = {"metadata": {"name": name}, "value": value}
            scheduling.create_priority_class({**body, "preemptionPolicy": "PreemptLowerPriority"})
        yield local
    finally:
        local.stop()

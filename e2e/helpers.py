"""Small helpers for e2e tests: polling with a readable failure, binaries or skip, a namespace
per test, a kubeconfig for a ServiceAccount."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client

from tidal.devcluster import Binaries, DevClusterError, find_binaries

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


def service_account_kubeconfig(cluster: Any, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig at ``path`` that authenticates as ServiceAccount ``namespace/name`` with a
    bound token (TokenRequest API), so a component runs with exactly its RBAC."""
    core = client.CoreV1Api(cluster.api_client())
    request = {"spec": {"expirationSeconds": 3600}}
    token = core.create_namespaced_service_account_token(name, namespace, request).status.token
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    user = f"{namespace}-{name}"
    config["users"] = [{"name": user, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = user
    path.write_text(yaml.safe_dump(config))
    return path

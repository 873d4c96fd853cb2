"""Fixtures shared by the e2e modules. Each module that starts its own control plane names it
`cluster` (so a failure report carries its logs); `core` and `custom` follow that choice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.helpers import fresh_namespace
from tidal.devcluster import LocalCluster


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> Any:
    return cluster.api_client()


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    """A namespace of the test's own, deleted (and drained) afterwards."""
    yield from fresh_namespace(client.CoreV1Api(api), "e2e")


@pytest.fixture
def core(cluster: LocalCluster) -> Any:
    return client.CoreV1Api(cluster.api_client())


@pytest.fixture
def custom(cluster: LocalCluster) -> Any:
    return client.CustomObjectsApi(cluster.api_client())

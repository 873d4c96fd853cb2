from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tidal.devcluster import LocalCluster


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> Any:
    return cluster.api_client()


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    """A namespace of the test's own, deleted afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)

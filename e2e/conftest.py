"""The session's real control plane (etcd, kube-apiserver, kube-scheduler, KWOK) for e2e tests.

Binaries come from the cache `tidal dev-cluster build` fills. Without them the e2e tests are
skipped, unless TIDAL_E2E=require (CI sets it), which turns a missing binary into a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.helpers import binaries_or_skip
from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.nodes import node_names

E2E_DIR = Path(__file__).parent
# Two node shapes: a flat NVSwitch node and a topology-rich cube-mesh node (8 GPUs each).
NODE_PRESETS = ["dgx-h100", "dgx1-v100"]
NODE_COUNT = 4


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    binaries = binaries_or_skip()
    local = LocalCluster(
        ClusterOptions(workdir=tmp_path_factory.mktemp("cluster"), controller_manager=True),
        binaries,
    )
    try:
        local.start()
        names = local.add_gpu_nodes(node_names(NODE_COUNT, NODE_PRESETS))
        local.wait_nodes_ready(names)
        yield local
    finally:
        local.stop()
        print(f"\ncontrol-plane logs kept in {local.log_dir}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """A failed e2e test carries the tail of every component's log in its report."""
    report = yield
    local = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(local, LocalCluster):
        report.sections.append(("control-plane logs", local.log_report()))
    return report

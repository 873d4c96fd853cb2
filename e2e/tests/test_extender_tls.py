"""kube-scheduler reaches the extender over mutual TLS (its `tlsConfig` with a client
certificate), as the Helm chart runs it when the two are in separate pods."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.helpers import binaries_or_skip, wait_for
from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.nodes import gpu_pod


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        ClusterOptions(
            workdir=tmp_path_factory.mktemp("tls-cluster"), run_extender=True, extender_tls=True
        ),
        binaries_or_skip(),
    )
    try:
        local.start()
        local.wait_nodes_ready(local.add_gpu_nodes([("tls-cube", "dgx1-v100")]))
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster(tls_cluster: LocalCluster) -> LocalCluster:
    """Named `cluster` so a failure report carries the control-plane logs."""
    return tls_cluster


def test_scheduler_binds_through_the_extender_over_https(cluster: LocalCluster) -> None:
    extender = cluster.options.extender
    assert extender is not None and extender.url_prefix.startswith("https://")
    config = yaml.safe_load((cluster.workdir / "scheduler-config.yaml").read_text())
    tls = config["extenders"][0]["tlsConfig"]
    assert tls["caFile"].endswith("ca.crt") and tls["certFile"].endswith("scheduler-client.crt")
    # the extender speaks only TLS, with a certificate the cluster CA vouches for
    plain = extender.url_prefix.replace("https://", "http://") + "/readyz"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=5)
    # ... and only to callers with a client certificate the CA signed
    anonymous = ssl.create_default_context(cafile=extender.ca_file)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"{extender.url_prefix}/readyz", context=anonymous, timeout=5)
    scheduler = ssl.create_default_context(cafile=extender.ca_file)
    assert extender.cert_file is not None and extender.key_file is not None
    scheduler.load_cert_chain(extender.cert_file, extender.key_file)
    assert urllib.request.urlopen(f"{extender.url_prefix}/readyz", context=scheduler).status == 200

    core: Any = client.CoreV1Api(cluster.api_client())
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace}})
    pod = gpu_pod("quad", 4, annotations={"tidal.dev/topology-mode": "guaranteed"})
    core.create_namespaced_pod(namespace, pod)

    def bound() -> str | None:
        got = core.read_namespaced_pod("quad", namespace)
        return (
            (got.metadata.annotations or {}).get("tidal.dev/gpus") if got.spec.node_name else None
        )

    assert wait_for(bound, "the pod bound through the HTTPS extender", 60) in ("0,1,2,3", "4,5,6,7")

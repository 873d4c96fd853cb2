"""One way to build a kubernetes client for every tidal component (kubeconfig or in-cluster)."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config


def api_client(kubeconfig: Path | None, pool_size: int = 16) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``, or from the pod's service account when None."""
    configuration = client.Configuration()
    if kubeconfig is None:
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)

"""One way to build a kubernetes client for every tidal component (kubeconfig or in-cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
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


# Calls made with `_preload_content=False` (raw JSON, no client models) return urllib3
# responses that hold their connection until the body is read and the connection released;
# one dropped unread costs a fresh TLS handshake on the next call.


def read_json(response: Any) -> Any:
    """The body of a raw response as JSON; the connection goes back to the pool."""
    try:
        return orjson.loads(response.data)
    finally:
        response.release_conn()


def discard(response: Any) -> None:
    """Drop a raw response's body, returning its connection to the pool."""
    if response is None:
        return
    response.drain_conn()
    response.release_conn()


def error_message(error: Any) -> str:
    """The API server's message from an ApiException (its Status body), else its reason."""
    body = error.body.decode() if isinstance(error.body, bytes) else str(error.body or "")
    try:
        return str(orjson.loads(body).get("message", body))
    except orjson.JSONDecodeError:
        return body or str(error.reason)

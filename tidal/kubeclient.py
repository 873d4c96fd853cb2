"""What every tidal component needs of the kubernetes client: one way to build it (kubeconfig or
in-cluster), raw-JSON responses, and one error type for failed API calls.

Errors: every call a component makes to the API server goes through :func:`call`, which turns
the client's ``ApiException`` (and a connection that failed) into :class:`KubeApiError`, chained
(``raise ... from error``), so the cause stays in every traceback::

    Exception
     └── RuntimeError
          └── KubeApiError   status (HTTP, 0 if the server was not reached), message, permanent
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")


class KubeApiError(RuntimeError):
    """A Kubernetes API call that failed. ``status`` is the HTTP status (0 when the server was
    not reached); the message says what was attempted and what the API server answered."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def permanent(self) -> bool:
        """No retry of the same request can succeed: 400 Bad Request, 422 Invalid (an object
        the spec makes invalid), 403 Forbidden (a missing PriorityClass, RBAC, policy). A 403
        for an exceeded ResourceQuota passes when other pods finish, so it is retried, as are
        0 (not reached), 401 (a token to renew), 404, 409, 429 and 5xx."""
        if self.status == 403:
            return "exceeded quota" not in str(self)
        return self.status in (400, 422)


def api_error(what: str, error: Exception) -> KubeApiError:
    """``error`` from the client as a KubeApiError saying ``what`` failed (chain it)."""
    if isinstance(error, ApiException):
        return KubeApiError(int(error.status or 0), f"{what}: {error_message(error)}")
    return KubeApiError(0, f"{what}: {error}")


def call(what: str, action: Callable[[], T]) -> T:
    """Run one API call; its failure is a KubeApiError naming ``what``, caused by the original."""
    try:
        return action()
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
        raise api_error(what, error) from error


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

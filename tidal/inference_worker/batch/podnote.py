"""Tell the operator where the last checkpoint is: an annotation on the worker's own pod.

The operator passes it to the next attempt as TIDAL_RESUME_FROM, and the scheduler extender
reads the pod's checkpoint age to weigh the work a preemption would lose. It is only a hint
(the output store is the truth), so a failed patch logs a warning and the job goes on, and a
worker with no Kubernetes credentials (run by hand, in a test) annotates nothing.

The patch is a JSON merge patch of ``metadata.annotations`` alone: it cannot touch any other
field, and needs no resourceVersion (no conflict with the operator's own writes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from tidal import api

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 10
NO_CREDENTIALS = "no Kubernetes credentials: checkpoint not annotated"


def checkpoint_patch(uri: str) -> dict[str, Any]:
    """The merge patch that records ``uri`` as the pod's last checkpoint."""
    return {"metadata": {"annotations": {api.ANNOTATION_CHECKPOINT: uri}}}


def kubeconfig_path(env: Mapping[str, str]) -> Path | None:
    """The kubeconfig the client would load (KUBECONFIG, else ~/.kube/config), if one exists.
    KUBECONFIG may list several files; the client merges them."""
    listed = env.get("KUBECONFIG", "")
    if listed:
        exists = any(Path(p).expanduser().is_file() for p in listed.split(os.pathsep) if p)
        return Path(listed) if exists else None
    home = env.get("HOME")
    default = Path(home) / ".kube" / "config" if home else Path("~/.kube/config").expanduser()
    return default if default.is_file() else None


def core_api_from(env: Mapping[str, str]) -> Any | None:
    """A CoreV1Api from the pod's service account or a kubeconfig; None without either."""
    from kubernetes import client  # noqa: PLC0415 (only a worker that annotates needs it)

    from tidal.kubeclient import api_client  # noqa: PLC0415

    if env.get("KUBERNETES_SERVICE_HOST"):
        return client.CoreV1Api(api_client(None, pool_size=1))
    kubeconfig = kubeconfig_path(env)
    if kubeconfig is None:
        return None
    return client.CoreV1Api(api_client(kubeconfig, pool_size=1))


class PodAnnotator:
    """Annotates pod ``namespace/name``; the API client is made on first use and kept."""

    def __init__(
        self,
        name: str,
        namespace: str,
        *,
        env: Mapping[str, str] | None = None,
        make_api: Callable[[Mapping[str, str]], Any | None] = core_api_from,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self._env = os.environ if env is None else env
        self._make_api = make_api
        self._api: Any | None = None
        self._tried = False

    def _core_api(self) -> Any | None:
        if not self._tried:
            self._tried = True
            try:
                self._api = self._make_api(self._env)
            except Exception as error:  # a broken kubeconfig must not fail the job
                log.warning("cannot build a Kubernetes client (%s)", error)
            if self._api is None:
                log.warning(NO_CREDENTIALS)
        return self._api

    def __call__(self, uri: str) -> bool:
        """Annotate the pod with ``uri``; whether the patch was made."""
        core = self._core_api()
        if core is None:
            return False
        try:
            response = core.patch_namespaced_pod(
                self.name,
                self.namespace,
                checkpoint_patch(uri),
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT_S,
                _preload_content=False,  # the pod is not needed back
            )
            response.release_conn()
        except Exception as error:  # the store is the truth; the job goes on
            log.warning(
                "could not annotate pod %s/%s with checkpoint %s: %s",
                self.namespace,
                self.name,
                uri,
                error,
            )
            return False
        return True


@cache
def _annotator(name: str, namespace: str) -> PodAnnotator:
    return PodAnnotator(name, namespace)


@cache
def _say_unnamed() -> None:
    log.info("TIDAL_POD_NAME or TIDAL_POD_NAMESPACE unset: checkpoint not annotated")


def annotate_checkpoint(uri: str) -> None:
    """Annotate this worker's pod (TIDAL_POD_NAME in TIDAL_POD_NAMESPACE) with ``uri``."""
    name = os.environ.get("TIDAL_POD_NAME", "")
    namespace = os.environ.get("TIDAL_POD_NAMESPACE", "")
    if not name or not namespace:
        _unannotated(uri)
        return
    _annotator(name, namespace)(uri)


def _unannotated(uri: str) -> None:
    _say_unnamed()


def for_pod(name: str | None, namespace: str | None) -> Callable[[str], None]:
    """The podnote callback for pod ``namespace/name`` (a no-op without both)."""
    if not name or not namespace:
        return _unannotated
    annotator = PodAnnotator(name, namespace)

    def note(uri: str) -> None:
        annotator(uri)

    return note

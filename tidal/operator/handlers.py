"""The kopf layer: which events trigger a reconcile, finalizers, events, settings.

Handlers are thin: every one of them ends in ``Reconciler.reconcile`` (a level-based reconcile
from a fresh read), so it does not matter which of them fires, how often, or after a restart.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from tidal.operator.crds import GROUP
from tidal.operator.kube import OperatorApiError
from tidal.operator.planner import Event
from tidal.operator.reconciler import Reconciler
from tidal.operator.spec import JOB_LABEL, SERVICE_LABEL

log = logging.getLogger(__name__)
KINDS = {"LLMService": "llmservices", "LLMBatchJob": "llmbatchjobs"}
# Often enough to apply a schedule entry within a minute of its time, and to notice pods that
# vanished while the operator was not watching.
TIMER_INTERVAL_S = 15.0


def post_event(obj: dict[str, Any], event: Event) -> None:
    """A Kubernetes Event on the LLMService / LLMBatchJob, for `kubectl describe`."""
    # A raw object is a valid kopf Body; kopf's stubs ask for its own wrapper type.
    body: Any = obj
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _reconcile(reconciler: Reconciler, kind: str, namespace: str, name: str, **extra: Any) -> None:
    try:
        reconciler.reconcile(kind, namespace, name, **extra)
    except OperatorApiError as error:
        if 400 <= error.status < 500 and error.status not in (404, 409, 429):
            raise kopf.PermanentError(str(error)) from error
        raise kopf.TemporaryError(str(error), delay=5) from error


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Register tidal's handlers on ``registry``."""
    for kind, plural in KINDS.items():
        _register_kind(registry, reconciler, kind, plural)
    for label in (SERVICE_LABEL, JOB_LABEL):
        _register_pods(registry, reconciler, label)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Keep kopf's own bookkeeping in annotations: the status schema is tidal's.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Only kopf's warnings become Events; tidal posts its own (scaled, preempted, …).
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 120
        settings.batching.worker_limit = 64


def _register_kind(
    registry: kopf.OperatorRegistry, reconciler: Reconciler, kind: str, plural: str
) -> None:
    resource = (GROUP, plural)

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    def changed(**kwargs: Any) -> None:
        _reconcile(reconciler, kind, kwargs["namespace"], kwargs["name"])

    @kopf.timer(*resource, id="tick", interval=TIMER_INTERVAL_S, registry=registry)
    def tick(**kwargs: Any) -> None:
        if kwargs["status"].get("phase") not in ("Succeeded", "Failed"):
            _reconcile(reconciler, kind, kwargs["namespace"], kwargs["name"])

    @kopf.on.delete(*resource, id="cleanup", registry=registry)
    def deleted(**kwargs: Any) -> None:
        # The finalizer stays until every pod is gone: no worker outlives its object.
        remaining = reconciler.cleanup(kind, kwargs["namespace"], kwargs["name"])
        if remaining:
            raise kopf.TemporaryError(f"waiting for {remaining} pods to terminate", delay=2)


def _register_pods(registry: kopf.OperatorRegistry, reconciler: Reconciler, label: str) -> None:
    @kopf.on.event(
        "", "v1", "pods", id="pod-event", labels={label: kopf.PRESENT}, registry=registry
    )
    def pod_changed(**kwargs: Any) -> None:
        event = kwargs["event"]
        pod = event.get("object") or {}
        owner = Reconciler.owner_of(pod)
        if owner is None:
            return
        gone = [pod] if event.get("type") == "DELETED" else []
        try:
            reconciler.reconcile(*owner, gone=gone)
        except OperatorApiError as error:
            # Event handlers are not retried; the owner's timer catches up.
            log.warning("reconcile of %s/%s/%s after a pod event: %s", *owner, error)

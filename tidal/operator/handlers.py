"""The kopf layer: which events trigger a reconcile, finalizers, events, settings.

Handlers are thin: every one of them ends in ``Reconciler.reconcile`` (a level-based reconcile
from a fresh read), so it does not matter which of them fires, how often, or after a restart.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import kopf

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.operator.desired import Event
from tidal.operator.reconciler import ReconcileError, Reconciler

log = logging.getLogger(__name__)
KINDS = api.WORKLOAD_PLURALS
# Often enough to apply a schedule entry within a minute of its time, and to notice pods that
# vanished while the operator was not watching.
TIMER_INTERVAL_S = 15.0
# How long the finalizer waits for the object's pods to go (a batch worker's grace period is
# 120 s) before it lets the object go anyway: the pods' ownerReferences still have the garbage
# collector delete them, and a namespace never hangs in Terminating on one of them.
CLEANUP_TIMEOUT_S = 600.0


def post_event(obj: dict[str, Any], event: Event) -> None:
    """A Kubernetes Event on the LLMService / LLMBatchJob, for `kubectl describe`."""
    # A raw object is a valid kopf Body; kopf's stubs ask for its own wrapper type.
    body: Any = obj
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _as_kopf_error(action: Callable[[], object]) -> None:
    """Run ``action``; a failure (already on the object as an Event and a Degraded condition)
    stops kopf's retries when permanent, else retries after a delay."""
    try:
        action()
    except ReconcileError as error:
        if error.permanent:
            raise kopf.PermanentError(str(error)) from error
        raise kopf.TemporaryError(str(error), delay=error.delay or 5) from error
    except KubeApiError as error:  # the object could not even be read
        if error.permanent:
            raise kopf.PermanentError(str(error)) from error
        raise kopf.TemporaryError(str(error), delay=5) from error


def _reconcile(reconciler: Reconciler, kind: str, namespace: str, name: str, **extra: Any) -> None:
    _as_kopf_error(lambda: reconciler.reconcile(kind, namespace, name, **extra))


def _tick(reconciler: Reconciler, kind: str, namespace: str, name: str, body: Any) -> None:
    _as_kopf_error(lambda: reconciler.tick(kind, namespace, name, body))


def cleanup_verdict(remaining: int, error: KubeApiError | None, runtime_s: float) -> str:
    """What the finalizer does next: "done" (no pods left), "wait" (retry), or "give-up"
    (let the object go with a Warning Event; the garbage collector removes its pods by their
    ownerReferences). A permanent API error or CLEANUP_TIMEOUT_S gives up: a finalizer that
    can never finish would keep the object, and its namespace, forever."""
    if error is None and remaining == 0:
        return "done"
    if (error is not None and error.permanent) or runtime_s >= CLEANUP_TIMEOUT_S:
        return "give-up"
    return "wait"


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Register tidal's handlers on ``registry``."""
    for kind, plural in KINDS.items():
        _register_kind(registry, reconciler, kind, plural)
    for label in (api.LABEL_LLMSERVICE, api.LABEL_LLMBATCHJOB):
        _register_pods(registry, reconciler, label)

    @kopf.on.event("", "v1", "nodes", id="node-event", registry=registry)
    def node_changed(**kwargs: Any) -> None:
        # A deleted node takes its pods with it at once; until the pod garbage collector
        # catches up (about a minute) they would still read Running.
        event = kwargs["event"]
        name = ((event.get("object") or {}).get("metadata") or {}).get("name")
        if not name:
            return
        if event.get("type") == "DELETED":
            reconciler.node_deleted(name)
        else:
            reconciler.node_added(name)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Keep kopf's own bookkeeping in annotations: the status schema is tidal's.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=api.GROUP, key="last-handled-configuration"
        )
        # tidal posts its own Events (scaled, preempted, failures with their reasons); kopf's
        # warnings and errors (a handler that failed) become Events too, not only log lines:
        # kopf posts its loggers' records only with `loggers` on.
        settings.posting.enabled = True
        settings.posting.loggers = True
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 120
        settings.queueing.worker_limit = 64
        # With peering (several replicas), kopf pauses every operator that sees a peer of the
        # same priority: replicas that all kept the default 0 would all pause. A random
        # priority per process leaves exactly one active (kopf's own recipe); the others take
        # over when its peering record expires.
        settings.peering.priority = random.SystemRandom().randint(1, 32767)


def _register_kind(
    registry: kopf.OperatorRegistry, reconciler: Reconciler, kind: str, plural: str
) -> None:
    resource = (api.GROUP, plural)

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    def changed(**kwargs: Any) -> None:
        # A new spec (or a restarted operator) tries again what was refused before.
        _reconcile(reconciler, kind, kwargs["namespace"], kwargs["name"], retry_refused=True)

    @kopf.timer(*resource, id="tick", interval=TIMER_INTERVAL_S, registry=registry)
    def tick(**kwargs: Any) -> None:
        # Decided from kopf's cached body: a settled object costs its timer no API call.
        _tick(reconciler, kind, kwargs["namespace"], kwargs["name"], kwargs["body"])

    @kopf.on.delete(*resource, id="cleanup", registry=registry)
    def deleted(**kwargs: Any) -> None:
        # The finalizer stays until every pod is gone (no worker outlives its object), unless
        # cleanup cannot finish: see cleanup_verdict.
        _finalize(reconciler, kind, kwargs)


def _finalize(reconciler: Reconciler, kind: str, kwargs: dict[str, Any]) -> None:
    """The delete handler: clean up, then let the object go, retry, or give up."""
    namespace, name = kwargs["namespace"], kwargs["name"]
    uid = (kwargs.get("meta") or {}).get("uid", "")
    remaining, failure = 0, None
    try:
        remaining = reconciler.cleanup(kind, namespace, name, uid)
    except KubeApiError as error:
        failure = error
    runtime = kwargs.get("runtime")
    runtime_s = runtime.total_seconds() if runtime is not None else 0.0
    verdict = cleanup_verdict(remaining, failure, runtime_s)
    if verdict == "give-up":
        why = str(failure) if failure else f"{remaining} pods still terminating"
        message = (
            f"cleanup gave up ({why}); the garbage collector deletes the remaining pods "
            "by their ownerReferences"
        )
        post_event(kwargs["body"], Event("Warning", "CleanupFailed", message))
        log.warning("%s %s/%s: %s", kind, namespace, name, message)
    elif verdict == "wait":
        why = str(failure) if failure else f"waiting for {remaining} pods to terminate"
        raise kopf.TemporaryError(why, delay=2)


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
        except (ReconcileError, KubeApiError) as error:
            # Event handlers are not retried; the owner's timer catches up. A failure is on
            # the object already.
            log.warning("reconcile of %s/%s/%s after a pod event: %s", *owner, error)

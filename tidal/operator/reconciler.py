"""Level-based reconciliation of one LLMService / LLMBatchJob: read, plan (pure), apply.

Every reconcile of an object runs under that object's lock and starts from a fresh GET, so
handlers, timers and pod events that fire together never plan from a stale status. Pod names
are deterministic, so a reconcile cut short (the operator killed mid-way) and run again creates
nothing twice.

A reconcile that fails says so on the object (a Warning Event and a Degraded condition) before
it raises ReconcileError, which tells the kopf layer whether a retry can help.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.operator.desired import (
    DesiredState,
    Event,
    already_reported,
    failed_status,
    needs_tick,
    plan_job,
    plan_service,
    refused,
    schedule_step,
    scheduled,
)
from tidal.operator.metrics import OperatorMetrics
from tidal.operator.spec import (
    ObservedPod,
    SpecError,
    controller_of,
    label_value_ok,
    observe_pod,
    parse_job,
    parse_service,
)

log = logging.getLogger(__name__)
Clock = Callable[[], dt.datetime]
OWNER_LABELS = {
    api.KIND_LLMSERVICE: api.LABEL_LLMSERVICE,
    api.KIND_LLMBATCHJOB: api.LABEL_LLMBATCHJOB,
}


class Kube(Protocol):
    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None: ...

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None: ...

    def owned_pods(self, label: str, namespace: str, name: str) -> list[dict[str, Any]]: ...

    def namespace_pods(self, namespace: str) -> list[dict[str, Any]]: ...

    def ensure_worker_identity(self, namespace: str) -> None: ...

    def create_pod(self, pod: dict[str, Any]) -> bool: ...

    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None: ...

    def pods_on_node(self, node: str) -> list[dict[str, Any]]: ...

    def node_free_gpus(self, nodes: Iterable[str]) -> dict[str, int]: ...


EventSink = Callable[[dict[str, Any], Event], None]
RETRY_DELAY_S = 5.0
# A deleted node is remembered this long (its pods are gone by then: the operator force-deletes
# them, and the pod garbage collector would too).
LOST_NODE_MEMORY_S = 600.0
# The timer reconciles a settled object (see needs_tick) this often, as a safety net for pod
# changes the watch missed; pod events reconcile at once anyway.
RESYNC_S = 300.0


class ReconcileError(Exception):
    """A reconcile that could not finish, already reported on the object. ``permanent``: no
    retry can cure it (an invalid spec, a pod the API server refuses) until the spec changes;
    else retry after ``delay`` seconds."""

    def __init__(self, reason: str, message: str, permanent: bool, delay: float = 0.0) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.permanent = permanent
        self.delay = delay


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        clock: Clock = utc_now,
        on_event: EventSink = lambda _o, _e: None,
        extra_priority_classes: tuple[str, ...] = (),
        monotonic: Callable[[], float] = time.monotonic,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.kube = kube
        self.clock = clock
        self.on_event = on_event
        self.extra_priority_classes = extra_priority_classes
        self.monotonic = monotonic
        self.metrics = metrics or OperatorMetrics()
        self._resynced: dict[tuple[str, str, str], float] = {}
        self._lost_nodes: dict[str, float] = {}  # deleted node -> when (monotonic)
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(kind, namespace, name)]

    def reconcile(
        self,
        kind: str,
        namespace: str,
        name: str,
        gone: Iterable[Mapping[str, Any]] = (),
        retry_refused: bool = False,
    ) -> DesiredState | None:
        """Bring ``kind`` ``namespace/name`` to its spec; None when it no longer exists, is
        being deleted (the finalizer handler cleans up then), or its generation was refused
        for good and ``retry_refused`` is False (timers and pod events; a create, update or
        resume of the object tries again). Raises ReconcileError, reported on the object."""
        with self._lock(kind, namespace, name):
            obj = self.kube.get_object(kind, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                self.metrics.forget(kind, namespace, name)
                return None
            if refused(obj) and not retry_refused:
                self._resynced[(kind, namespace, name)] = self.monotonic()  # nothing to resync
                return None
            desired = self._reported(kind, obj, [observe_pod(p) for p in gone])
            self._resynced[(kind, namespace, name)] = self.monotonic()
            return desired

    def _reported(self, kind: str, obj: dict[str, Any], gone: list[ObservedPod]) -> DesiredState:
        """Reconcile ``obj``; a failure is reported on it, then raised as a ReconcileError."""
        try:
            if kind == api.KIND_LLMSERVICE:
                return self._service(obj, gone)
            return self._job(obj, gone)
        except ReconcileError:
            raise
        except SpecError as error:
            self._report(obj, "InvalidSpec", str(error))
            raise ReconcileError("InvalidSpec", str(error), permanent=True) from error
        except KubeApiError as error:
            self._report(obj, "ApiError", str(error))
            raise ReconcileError(
                "ApiError", str(error), permanent=error.permanent, delay=RETRY_DELAY_S
            ) from error
        except Exception as error:
            # A bug: said on the object too, then kopf retries it with its backoff.
            self._report(obj, "InternalError", f"{type(error).__name__}: {error}")
            raise

    def tick(
        self, kind: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> DesiredState | None:
        """The timer, given kopf's cached ``body``: a reconcile only when the object is not
        settled, a schedule entry is due, or RESYNC_S passed since the last one. Listing and
        planning every pod of every object each tick cost a 1,024-worker job a third of a
        core while nothing happened."""
        if kind == api.KIND_LLMBATCHJOB and (body.get("status") or {}).get("phase") in (
            "Succeeded",
            "Failed",
        ):
            return None
        last = self._resynced.get((kind, namespace, name))
        stale = last is None or self.monotonic() - last >= RESYNC_S
        if stale or needs_tick(body) or self._schedule_due(kind, body):
            return self.reconcile(kind, namespace, name)
        return None

    def _schedule_due(self, kind: str, body: Mapping[str, Any]) -> bool:
        if kind != api.KIND_LLMSERVICE or not (body.get("spec") or {}).get("autoscaling"):
            return False
        try:
            service = parse_service(body, self.extra_priority_classes)
        except SpecError:
            return True  # reconcile says so (once)
        return schedule_step(service, self.clock(), body.get("status") or {}) is not None

    def _report(self, obj: dict[str, Any], reason: str, message: str, **status: Any) -> None:
        """A Warning Event and a Degraded condition on ``obj``; best effort (the API server
        may be what failed), so a failure to report is only logged."""
        meta = obj["metadata"]
        previous = {**(obj.get("status") or {}), **status}
        failed = failed_status(
            previous, int(meta.get("generation", 0)), reason, message, _stamp(self.clock())
        )
        repeated = already_reported(obj.get("status") or {}, failed)
        patch = {**status, **failed}
        log.warning(
            "%s %s/%s: %s: %s", obj["kind"], meta["namespace"], meta["name"], reason, message
        )
        try:
            self.kube.patch_status(obj["kind"], meta["namespace"], meta["name"], patch)
            if not repeated:
                self.on_event(obj, Event("Warning", reason, message))
        except Exception as error:  # reporting must not hide the first error
            log.warning(
                "could not report %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error
            )

    def _service(self, obj: dict[str, Any], gone: list[ObservedPod]) -> DesiredState:
        """Read (the service, its pods, free GPUs only when a scale-down needs them), plan
        (pure: a due schedule step and the pods, from the spec parsed once), apply (the scale
        first)."""
        service = parse_service(obj, self.extra_priority_classes)
        status, now = _status(obj), self.clock()
        step = schedule_step(service, now, status)
        pods = self._observe(self._pods(obj))
        replicas = scheduled(service, step).desired_replicas()
        free = self._free_gpus(pods, replicas)
        desired = plan_service(service, pods, free, status, _stamp(now), gone, step)
        self._apply(obj, desired)
        workload = service.workload
        self.metrics.service(workload.namespace, workload.name, replicas, desired.status)
        return desired

    def _job(self, obj: dict[str, Any], gone: list[ObservedPod]) -> DesiredState:
        """Read (the job, its pods), plan (pure), apply."""
        job = parse_job(obj, self.extra_priority_classes)
        status, now = _status(obj), self.clock()
        pods = self._observe(self._pods(obj))
        desired = plan_job(job, pods, status, _stamp(now), gone)
        self._apply(obj, desired)
        workload = job.workload
        self.metrics.job(
            workload.namespace,
            workload.name,
            workload.tensor_parallel,
            pods,
            gone,
            desired.status,
            now.timestamp(),
        )
        return desired

    def _free_gpus(self, pods: list[ObservedPod], replicas: int) -> dict[str, int]:
        """Free GPUs per node of the live pods: they only order a scale-down, so no node is
        read while the live pods are not more than ``replicas``."""
        live = [p for p in pods if p.live]
        if len(live) <= replicas:
            return {}
        return self.kube.node_free_gpus(p.node for p in live if p.bound)

    def _observe(self, pods: Iterable[dict[str, Any]]) -> list[ObservedPod]:
        """Observed pods, those on a node deleted lately marked lost: until the pod garbage
        collector noticed (about a minute) they would still show Running."""
        now = self.monotonic()
        for node, since in list(self._lost_nodes.items()):
            if now - since > LOST_NODE_MEMORY_S:
                del self._lost_nodes[node]
        observed = [observe_pod(p) for p in pods]
        return [replace(p, lost=True) if p.node in self._lost_nodes else p for p in observed]

    def node_deleted(self, node: str) -> list[tuple[str, str, str]]:
        """A node was deleted: reconcile at once every object with a pod on it (their pods
        are lost); the objects reconciled."""
        self._lost_nodes[node] = self.monotonic()
        owners = list(
            dict.fromkeys(o for p in self.kube.pods_on_node(node) if (o := self.owner_of(p)))
        )
        for owner in owners:
            try:
                self.reconcile(*owner)
            except (ReconcileError, KubeApiError) as error:  # on the object already
                log.warning("reconcile of %s/%s/%s after node %s went: %s", *owner, node, error)
        return owners

    def node_added(self, node: str) -> None:
        """A node of that name exists (again): its new pods are not lost."""
        self._lost_nodes.pop(node, None)

    def _pods(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """The pods this object controls: found by the owner label, kept by the controller
        reference (anyone who may create pods can copy a label; a second controller's pods
        counted as this one's replicas would make the two fight over them)."""
        meta = obj["metadata"]
        label = OWNER_LABELS[obj["kind"]]
        pods = self.kube.owned_pods(label, meta["namespace"], meta["name"])
        return _controlled(pods, obj["kind"], meta.get("uid", ""))

    def _apply(self, obj: dict[str, Any], desired: DesiredState) -> None:
        """Make ``desired`` true: scale, delete pods, create pods (the workers' identity in
        their namespace first), write status, post Events."""
        meta = obj["metadata"]
        if desired.replicas is not None:
            self.kube.set_replicas(meta["namespace"], meta["name"], desired.replicas)
        for pod_name in dict.fromkeys(desired.force_delete):
            self.kube.delete_pod(meta["namespace"], pod_name, grace_s=0)
        for pod_name in dict.fromkeys(desired.delete):
            if pod_name not in desired.force_delete:
                self.kube.delete_pod(meta["namespace"], pod_name)
        if desired.create:
            # Every reconcile that creates pods, not once per namespace: a ServiceAccount
            # deleted meanwhile would make every later worker pod a refused create.
            self.kube.ensure_worker_identity(meta["namespace"])
        for pod in desired.create:
            self._create(obj, pod, desired)
        # An idle object's plan repeats its status: skip the write (and the watch event every
        # client of the object would decode) when every field is already what it says.
        if any(_status(obj).get(key) != value for key, value in desired.status.items()):
            self.kube.patch_status(obj["kind"], meta["namespace"], meta["name"], desired.status)
        for event in desired.events:
            self.on_event(obj, event)

    def _create(self, obj: dict[str, Any], pod: dict[str, Any], desired: DesiredState) -> None:
        """Create one of ``desired``'s pods; one that exists already (a repeated plan) is fine."""
        try:
            created = self.kube.create_pod(pod)
        except KubeApiError as error:
            if not error.permanent:
                raise
            # Every pod of this spec would be refused alike: say so once, keep what the
            # plan counted (the status of the pods that exist), and wait for a new spec.
            message = f"the API server refuses pod {pod['metadata']['name']}: {error}"
            self._report(obj, "PodRejected", message, **desired.status)
            for event in desired.events:
                self.on_event(obj, event)
            raise ReconcileError("PodRejected", message, permanent=True) from error
        if created:
            meta = obj["metadata"]
            log.info(
                "%s %s/%s: created pod %s",
                obj["kind"],
                meta["namespace"],
                meta["name"],
                pod["metadata"]["name"],
            )

    def cleanup(self, kind: str, namespace: str, name: str, uid: str = "") -> int:
        """Delete the object's pods (on its deletion); the number still present.

        A name that cannot be a label value (an object stored before the CRD bounded names)
        makes an invalid label selector, so such an object's pods are found by their
        controller reference among the namespace's pods instead."""
        with self._lock(kind, namespace, name):
            self._resynced.pop((kind, namespace, name), None)
            self.metrics.forget(kind, namespace, name)
            if label_value_ok(name):
                pods = self.kube.owned_pods(OWNER_LABELS[kind], namespace, name)
            else:
                pods = self.kube.namespace_pods(namespace)
            pods = _controlled(pods, kind, uid) if uid else pods
            for pod in pods:
                if not pod["metadata"].get("deletionTimestamp"):
                    self.kube.delete_pod(namespace, pod["metadata"]["name"])
            return len(pods)

    @staticmethod
    def owner_of(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
        """(kind, namespace, name) of the LLMService / LLMBatchJob controlling a pod, by its
        controller reference (what the operator wrote), not by its labels."""
        meta = pod.get("metadata") or {}
        owner = controller_of(pod)
        if owner is None or owner[0] not in OWNER_LABELS:
            return None
        return owner[0], meta.get("namespace", "default"), owner[1]


def _status(obj: Mapping[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = obj.get("status") or {}
    return status


def _controlled(pods: Iterable[dict[str, Any]], kind: str, uid: str) -> list[dict[str, Any]]:
    """The pods whose controller reference is the ``kind`` object ``uid``."""
    out = []
    for pod in pods:
        owner = controller_of(pod)
        if owner is not None and owner[0] == kind and owner[2] == uid:
            out.append(pod)
    return out

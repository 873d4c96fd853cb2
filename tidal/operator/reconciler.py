"""Level-based reconciliation of one LLMService / LLMBatchJob: read, plan (pure), apply.

Every reconcile of an object runs under that object's lock and starts from a fresh GET, so
handlers, timers and pod events that fire together never plan from a stale status. Pod names
are deterministic, so a reconcile cut short (the operator killed mid-way) and run again creates
nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from tidal.operator.planner import Event, Plan, plan_job, plan_service, scheduled_replicas
from tidal.operator.spec import (
    JOB_LABEL,
    SERVICE_LABEL,
    ObservedPod,
    observe_pod,
    parse_job,
    parse_service,
)

log = logging.getLogger(__name__)
Clock = Callable[[], dt.datetime]
OWNER_LABELS = {"LLMService": SERVICE_LABEL, "LLMBatchJob": JOB_LABEL}


class Kube(Protocol):
    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None: ...

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None: ...

    def owned_pods(self, label: str, namespace: str, name: str) -> list[dict[str, Any]]: ...

    def create_pod(self, pod: dict[str, Any]) -> bool: ...

    def delete_pod(self, namespace: str, name: str) -> None: ...

    def node_free_gpus(self, nodes: Iterable[str]) -> dict[str, int]: ...


EventSink = Callable[[dict[str, Any], Event], None]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(
        self, kube: Kube, clock: Clock = utc_now, on_event: EventSink = lambda _o, _e: None
    ) -> None:
        self.kube = kube
        self.clock = clock
        self.on_event = on_event
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(kind, namespace, name)]

    def reconcile(
        self, kind: str, namespace: str, name: str, gone: Iterable[Mapping[str, Any]] = ()
    ) -> Plan | None:
        """Bring ``kind`` ``namespace/name`` to its spec; None when it no longer exists or is
        being deleted (the finalizer handler cleans up then)."""
        with self._lock(kind, namespace, name):
            obj = self.kube.get_object(kind, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            if kind == "LLMService":
                return self._service(obj, [observe_pod(p) for p in gone])
            return self._job(obj, [observe_pod(p) for p in gone])

    def _service(self, obj: dict[str, Any], gone: list[ObservedPod]) -> Plan:
        meta, status = obj["metadata"], obj.get("status") or {}
        service = parse_service(obj)
        now = self.clock()
        step = scheduled_replicas(service.autoscaling, now, status.get("scheduleSlot", ""))
        if step is not None:
            slot, replicas = step
            self.kube.set_replicas(meta["namespace"], meta["name"], replicas)
            self.on_event(
                obj, Event("Normal", "Scheduled", f"schedule {slot}: {replicas} replicas")
            )
            obj = {**obj, "spec": {**obj["spec"], "replicas": replicas}}
            service = parse_service(obj)
            status = {**status, "scheduleSlot": slot}
        pods = [observe_pod(p) for p in self._pods(obj)]
        live = [p for p in pods if p.live]
        # Free GPUs per node only order a scale-down; skip the node reads otherwise.
        surplus = len(live) > service.desired_replicas()
        free = self.kube.node_free_gpus(p.node for p in live if p.bound) if surplus else {}
        plan = plan_service(service, pods, free, status, _stamp(now), gone)
        if "scheduleSlot" in status:
            plan.status["scheduleSlot"] = status["scheduleSlot"]
        self._apply(obj, plan)
        return plan

    def _job(self, obj: dict[str, Any], gone: list[ObservedPod]) -> Plan:
        job = parse_job(obj)
        pods = [observe_pod(p) for p in self._pods(obj)]
        plan = plan_job(job, pods, obj.get("status") or {}, _stamp(self.clock()), gone)
        self._apply(obj, plan)
        return plan

    def _pods(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        meta = obj["metadata"]
        label = OWNER_LABELS[obj["kind"]]
        return self.kube.owned_pods(label, meta["namespace"], meta["name"])

    def _apply(self, obj: dict[str, Any], plan: Plan) -> None:
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        for pod_name in dict.fromkeys(plan.delete):
            self.kube.delete_pod(namespace, pod_name)
        for pod in plan.create:
            if self.kube.create_pod(pod):
                log.info(
                    "%s %s/%s: created pod %s",
                    obj["kind"],
                    namespace,
                    name,
                    pod["metadata"]["name"],
                )
        self.kube.patch_status(obj["kind"], namespace, name, plan.status)
        for event in plan.events:
            self.on_event(obj, event)

    def cleanup(self, kind: str, namespace: str, name: str) -> int:
        """Delete the object's pods (on its deletion); the number still present."""
        with self._lock(kind, namespace, name):
            pods = self.kube.owned_pods(OWNER_LABELS[kind], namespace, name)
            for pod in pods:
                if not pod["metadata"].get("deletionTimestamp"):
                    self.kube.delete_pod(namespace, pod["metadata"]["name"])
            return len(pods)

    @staticmethod
    def owner_of(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
        """(kind, namespace, name) of the LLMService / LLMBatchJob a pod belongs to."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        for kind, label in OWNER_LABELS.items():
            if label in labels:
                return kind, meta.get("namespace", "default"), labels[label]
        return None

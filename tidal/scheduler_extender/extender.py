"""The extender: what its four verbs share, and each verb's decision turned into the wire
response in one place. The decisions themselves are in one module per verb: ``filtering``,
``prioritizing``, ``preempting``, ``binding``.

The request body is not trusted for anything the cluster knows: the pod in a filter, prioritize
or preempt call only names a pod (namespace, name, UID); what it asks for (GPUs, priority,
annotations, scheduler name) is read from the extender's own cache of it, or from the API
server when the watch has not brought it yet. A pod that does not exist, has another UID, is
already bound or is not tidal's is refused, and bind binds a pod only to a node that the
extender's own filter passed for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.placement import Plan, PodRequest, Reservation, TopologyFirstPlanner
from tidal.scheduler_extender import binding, filtering, preempting, prioritizing
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.metrics import ExtenderMetrics
from tidal.scheduler_extender.translate import ObjectError, ReservationRecord, pod_request
from tidal.scheduler_extender.wire import (
    BindArgs,
    FilterArgs,
    PreemptArgs,
    filter_result,
    preempt_result,
)
from tidal.topology import bits

log = logging.getLogger(__name__)


class Actions(Protocol):
    """What the extender does to the cluster (a real client, or a fake in unit tests)."""

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def set_reservation(self, namespace: str, name: str, message: str) -> None:
        """Record a plan as the pod's ``tidal.dev/reservation`` condition (pods/status)."""

    def end_reservation(self, namespace: str, name: str, reason: str) -> None:
        """Mark the condition False and touch the pod's metadata so kube-scheduler retries
        it (a status change alone does not requeue a pod)."""

    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None: ...

    def mark_disruption_target(self, namespace: str, name: str, message: str) -> None: ...

    def evict(self, namespace: str, name: str) -> None: ...

    def record_event(self, pod: dict[str, Any], reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class ExtenderSettings:
    reservation_ttl_s: float = 300.0  # victims' grace period plus scheduling slack
    planning_deadline_s: float = 0.05
    scheduler_name: str = api.SCHEDULER_NAME  # the only pods the extender places or binds


# Pods between filter and bind: bind is asynchronous in kube-scheduler, so several pods' binds
# can be in flight; far more than ever are at once.
_FILTERED_PODS = 4096


class RefusedError(Exception):
    """A call about a pod the extender will not act on; the message says why."""


class Extender:
    """The verbs' shared state: the cache, the actions on the cluster, the planner, and what
    one call leaves for the next (filter's scores for prioritize, the nodes filter passed for
    bind, pods steered to kube-scheduler's preemption)."""

    def __init__(
        self,
        cache: ClusterCache,
        actions: Actions,
        settings: ExtenderSettings | None = None,
        metrics: ExtenderMetrics | None = None,
    ) -> None:
        self.cache = cache
        self.actions = actions
        self.settings = settings or ExtenderSettings()
        self.planner = TopologyFirstPlanner(deadline_s=self.settings.planning_deadline_s)
        self.metrics = metrics or ExtenderMetrics()
        self.steered: dict[str, float] = {}  # pods left to kube-scheduler's preemption once
        self.scores: dict[str, dict[str, int]] = {}  # pod UID -> node scores from its filter
        self.passed: OrderedDict[str, frozenset[str]] = OrderedDict()  # UID -> nodes passed

    # -- the verbs: decide, count, answer -------------------------------------------------
    def filter(self, args: FilterArgs) -> dict[str, Any]:
        try:
            pod, request = self.request_for(args.pod)
            decision = filtering.decide(self, args, pod, request)
        except RefusedError as error:
            decision = filtering.FilterDecision("refused", error=str(error))
        self.metrics.decision("filter", decision.outcome)
        if decision.pod_uid is not None:
            with self.cache.lock:
                self._remember_passed(decision.pod_uid, decision.passed)
        return filter_result(
            decision.passed, decision.failed, decision.unresolvable, args, decision.error
        )

    def prioritize(self, args: FilterArgs) -> list[dict[str, Any]]:
        try:
            _, request = self.request_for(args.pod)
        except RefusedError:
            return [{"Host": n, "Score": 0} for n in args.node_names]
        return [
            {"Host": n, "Score": s} for n, s in prioritizing.decide(self, request, args.node_names)
        ]

    def preempt(self, args: PreemptArgs) -> dict[str, Any]:
        try:
            pod, request = self.request_for(args.pod)
            decision = preempting.decide(self, args, pod, request)
        except RefusedError as error:
            log.warning("preempt: %s", error)
            decision = preempting.PreemptDecision("refused")
        self.metrics.decision("preempt", decision.outcome)
        return preempt_result(decision.node, list(decision.victims), decision.pdb_violations)

    def bind(self, args: BindArgs) -> dict[str, Any]:
        wire = {"metadata": {"namespace": args.namespace, "name": args.name, "uid": args.uid}}
        try:
            pod, request = self.request_for(wire)
            decision = binding.decide(self, args, pod, request)
        except RefusedError as error:
            decision = binding.BindDecision("refused", str(error))
        self.metrics.decision("bind", decision.outcome)
        return {"Error": decision.error}

    # -- which pod a call is about ----------------------------------------------------------
    def _known_pod(self, wire_pod: dict[str, Any]) -> dict[str, Any]:
        """The cluster's copy of the pod a call names; raises RefusedError if there is none to act
        on. The cache answers almost always; the API server when the watch lags."""
        meta = wire_pod["metadata"]
        namespace, name, uid = meta.get("namespace") or "default", meta["name"], meta["uid"]
        with self.cache.lock:
            pod = self.cache.pending.get(uid)
            bound = self.cache.bound_pod(uid) is not None
        if bound:
            raise RefusedError(f"pod {namespace}/{name} is already bound")
        if pod is None:
            pod = self.actions.get_pod(namespace, name)
        if pod is None:
            raise RefusedError(f"pod {namespace}/{name} does not exist")
        actual = pod.get("metadata") or {}
        if (actual.get("uid"), actual.get("namespace") or "default", actual.get("name")) != (
            uid,
            namespace,
            name,
        ):
            raise RefusedError(f"pod {namespace}/{name} has another UID than {uid}")
        if (pod.get("spec") or {}).get("nodeName"):
            raise RefusedError(f"pod {namespace}/{name} is already bound")
        scheduler = (pod.get("spec") or {}).get("schedulerName")
        if scheduler != self.settings.scheduler_name:
            raise RefusedError(
                f"pod {namespace}/{name} is for scheduler {scheduler!r}, "
                f"not {self.settings.scheduler_name!r}"
            )
        return pod

    def request_for(self, wire_pod: dict[str, Any]) -> tuple[dict[str, Any], PodRequest]:
        pod = self._known_pod(wire_pod)
        try:
            return pod, pod_request(pod)
        except ObjectError as error:
            raise RefusedError(str(error)) from error

    def _remember_passed(self, uid: str, nodes: list[str]) -> None:
        self.passed[uid] = frozenset(nodes)
        self.passed.move_to_end(uid)
        while len(self.passed) > _FILTERED_PODS:
            self.passed.popitem(last=False)

    # -- reservations -------------------------------------------------------------------------
    def reserve(self, request: PodRequest, plan: Plan) -> ReservationRecord:
        """Hold ``plan``'s GPUs and victims for ``request`` (the caller records it on the pod)."""
        record = ReservationRecord(
            node=plan.node,
            gpus=tuple(bits(plan.gpus)),
            victims=plan.victims,
            expires_at=self.cache.snapshot.now + self.settings.reservation_ttl_s,
        )
        self.cache.reserve(record.reservation(request.uid))
        self.metrics.preemption(len(plan.victims))
        return record

    def end_reservation(self, namespace: str, name: str, reason: str) -> None:
        try:
            self.actions.end_reservation(namespace, name, reason)
        except KubeApiError as error:
            log.warning("could not end reservation on %s/%s: %s", namespace, name, error)

    # -- housekeeping -----------------------------------------------------------------------
    def expire_reservations(self) -> list[Reservation]:
        """Drop expired reservations and clear their annotations (run periodically)."""
        with self.cache.lock:
            expired = self.cache.tick()
            keys = {}
            for reservation in expired:
                pod = self.cache.pending.get(reservation.preemptor)
                if pod is not None:
                    keys[reservation.preemptor] = pod["metadata"]
        for meta in keys.values():
            self.end_reservation(meta.get("namespace", "default"), meta["name"], "Expired")
        for reservation in expired:
            log.info("reservation of %s on %s expired", reservation.preemptor, reservation.node)
        return expired

    def stats(self) -> dict[str, int]:
        with self.cache.lock:
            snapshot = self.cache.snapshot
            return {
                "nodes": len(snapshot.nodes),
                "pods": len(snapshot.pods),
                "pending": len(self.cache.pending),
                "reservations": len(snapshot.reservations),
                "topologies": self.cache.published_topologies(),
                "unhealthy_gpus": self.cache.unhealthy_gpus(),
            }

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
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Protocol

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.placement import Demand, Plan, PodRequest, Reservation, TopologyFirstPlanner
from tidal.scheduler_extender import binding, filtering, preempting, prioritizing
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.metrics import CacheView, ExtenderMetrics, PreemptionFacts
from tidal.scheduler_extender.pool import gpu_pool, pod_class
from tidal.scheduler_extender.translate import ObjectError, ReservationRecord, pod_request
from tidal.scheduler_extender.wire import (
    BindArgs,
    FilterArgs,
    PreemptArgs,
    filter_result,
    preempt_result,
)
from tidal.topology import bits
from tidal.webview.snapshot import RECENT_PREEMPTIONS, PreemptionRecord, Victim

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
# Pods whose filter history is kept (last outcome, first failure): more than are ever pending.
_WAITING_PODS = 16384
UNFILTERED = "unfiltered"  # a pending pod no filter call was seen for (a metric label)
# How long filter on the server's event loop waits for the cache lock before handing the call
# to a thread: reflectors hold it for microseconds, a relist or a preemption plan for longer.
_LOOP_LOCK_WAIT_S = 0.005


@dataclass
class _Waiting:
    """What the metrics remember of a pod between its first filter call and its bind."""

    outcome: str  # of its last filter call
    first_failed: float | None = None  # when a filter (or preempt) call first found no node
    preemptor: bool = False  # GPUs were reserved for it


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
        self.waiting: OrderedDict[str, _Waiting] = OrderedDict()  # UID -> its filter history
        self.demand = Demand()  # GPU demand per request class, from the pods filter sees
        # The latest preemptions carried out, oldest first, for the web view (under the lock).
        self.preemptions: deque[PreemptionRecord] = deque(maxlen=RECENT_PREEMPTIONS)
        self.metrics.cache.source = self.cache_view

    # -- the verbs: decide, count, answer -------------------------------------------------
    def filter(self, args: FilterArgs) -> dict[str, Any]:
        try:
            pod, request = self.request_for(args.pod)
            decision = filtering.decide(self, args, pod, request)
        except RefusedError as error:
            decision = filtering.FilterDecision("refused", error=str(error))
        return self._filter_answer(args, decision)

    def filter_from_cache(self, args: FilterArgs) -> dict[str, Any] | None:
        """filter's answer when the cache alone decides it (a cached pod that fits now or
        holds a reservation), or None: then :meth:`filter` must run, in a thread, since it may
        call the API server (a pod the watch has not delivered yet, a preemption). The server
        answers the common case on its event loop, so the serial scheduling cycle does not wait
        for a pool thread and the GIL behind the binds in flight."""
        lock = self.cache.lock
        if not lock.acquire(timeout=_LOOP_LOCK_WAIT_S):
            return None  # a relist or a preemption plan holds the cache: not on the loop
        try:
            if args.pod["metadata"]["uid"] not in self.cache.pending:
                return None
            try:
                pod, request = self.request_for(args.pod)
            except RefusedError:
                return None  # filter refuses it, and counts it
            decision = filtering.decide_from_cache(self, args, pod, request)
        finally:
            lock.release()
        if not isinstance(decision, filtering.FilterDecision):
            return None
        return self._filter_answer(args, decision)

    def _filter_answer(
        self, args: FilterArgs, decision: filtering.FilterDecision
    ) -> dict[str, Any]:
        self.metrics.decision("filter", decision.outcome)
        with self.cache.lock:
            self._note_filter(args.pod["metadata"]["uid"], decision.outcome)
            if decision.pod_uid is not None:
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
        with self.cache.lock:
            self._waiting(args.pod["metadata"]["uid"], failed=True)
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
        else:
            if decision.outcome == "bound":
                self._note_bound(request, decision.tier)
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

    # -- what the metrics remember of pending pods -----------------------------------------
    def _waiting(self, uid: str, failed: bool) -> _Waiting:
        """The pod's record (made on first sight); ``failed`` notes a call that found no node.
        Under the cache lock."""
        record = self.waiting.get(uid)
        if record is None:
            record = self.waiting[uid] = _Waiting(UNFILTERED)
            while len(self.waiting) > _WAITING_PODS:
                self.waiting.popitem(last=False)
        self.waiting.move_to_end(uid)
        if failed and record.first_failed is None:
            record.first_failed = self.cache.clock()
        return record

    def _note_filter(self, uid: str, outcome: str) -> None:
        self._waiting(uid, failed=outcome not in filtering.PASSED).outcome = outcome

    def _note_bound(self, request: PodRequest, tier: str) -> None:
        """Count the bind by its tiers; a preemptor's wait ends here; the pod's record goes."""
        self.metrics.bound(request.mode.value, request.tier.label, tier)
        with self.cache.lock:
            record = self.waiting.pop(request.uid, None)
            now = self.cache.clock()
        if record is not None and record.preemptor and record.first_failed is not None:
            self.metrics.preemptor_wait.observe(max(0.0, now - record.first_failed))

    def pending_outcomes(self) -> dict[str, str]:
        """Each unbound GPU pod for this extender's scheduler (by UID) with its last filter
        outcome, or ``unfiltered``."""
        outcomes = {}
        with self.cache.lock:
            for uid, pod in self.cache.pending.items():
                if (pod.get("spec") or {}).get("schedulerName") != self.settings.scheduler_name:
                    continue
                record = self.waiting.get(uid)
                outcomes[uid] = record.outcome if record is not None else UNFILTERED
        return outcomes

    def pending_reasons(self) -> dict[str, int]:
        """Unbound GPU pods for this extender's scheduler, by their last filter outcome (every
        outcome, 0 included)."""
        counts = dict.fromkeys((*filtering.OUTCOMES, UNFILTERED), 0)
        for reason in self.pending_outcomes().values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def cache_view(self) -> CacheView:
        """What the cache collector exports, computed at scrape time."""
        pending = self.pending_reasons()
        return CacheView(gpu_pool(self.cache.pool_inputs()), pending)

    # -- reservations -------------------------------------------------------------------------
    def reserve(self, request: PodRequest, plan: Plan, pod: dict[str, Any]) -> ReservationRecord:
        """Hold ``plan``'s GPUs and victims for ``request`` (the caller records it on the pod
        and holds the cache lock)."""
        record = ReservationRecord(
            node=plan.node,
            gpus=tuple(bits(plan.gpus)),
            victims=plan.victims,
            expires_at=self.cache.snapshot.now + self.settings.reservation_ttl_s,
        )
        self.cache.reserve(record.reservation(request.uid))
        self._waiting(request.uid, failed=True).preemptor = True
        victims = self._victims(plan)
        facts = self._preemption_facts(request, plan, pod, victims)
        self.metrics.preemption(facts)
        self.preemptions.append(
            PreemptionRecord(
                time=self.cache.clock(),
                preemptor=request.name,
                klass=facts.preemptor_class,
                tier=facts.tier,
                node=plan.node,
                victims=victims,
                victim_gpus=sum(facts.victim_gpus.values()),
                wasted_gpus=facts.wasted_gpus,
                lost_gpu_seconds=facts.lost_gpu_seconds,
            )
        )
        return record

    def _victims(self, plan: Plan) -> tuple[Victim, ...]:
        """The plan's victims as the cache knows them (under the cache lock)."""
        victims = []
        for uid in plan.victims:
            info = self.cache.snapshot.pods.get(uid)
            name = info.name if info else uid
            klass = pod_class(self.cache.bound_pod(uid))
            victims.append(Victim(name, klass, info.gpu_count if info else 0))
        return tuple(victims)

    def _preemption_facts(
        self, request: PodRequest, plan: Plan, pod: dict[str, Any], victims: tuple[Victim, ...]
    ) -> PreemptionFacts:
        victim_gpus: dict[str, int] = {}
        for victim in victims:
            victim_gpus[victim.klass] = victim_gpus.get(victim.klass, 0) + victim.gpus
        return PreemptionFacts(
            preemptor_class=pod_class(pod),
            tier=request.tier.label,
            victim_gpus=victim_gpus,
            victims=len(plan.victims),
            wasted_gpus=plan.cost.waste_gpus,
            lost_gpu_seconds=plan.cost.lost_work,
        )

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

"""The four verbs over the cluster cache and the placement core.

Filter passes nodes with a free aligned GPU set. When none passes it plans the best preemption
over the whole cluster once and steers kube-scheduler to it: a plan on a node short of GPUs by
count is left to kube-scheduler's own preemption (whose dry run finds victims there and calls our
preempt verb, which answers with the plan); a topology-only conflict (enough GPUs by count, none
aligned) is invisible to that dry run (kubernetes#139270), so the extender evicts the victims
itself and holds the GPUs with a reservation recorded on the preemptor pod.

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
from typing import Any, Protocol, cast

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.placement import (
    Code,
    FilterResult,
    NoPlan,
    Plan,
    PodRequest,
    Reservation,
    TopologyFirstPlanner,
    filter_nodes,
    fit_node,
    score,
)
from tidal.placement.cost import CostTuple
from tidal.placement.fit import Placement
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.metrics import ExtenderMetrics
from tidal.scheduler_extender.translate import (
    ObjectError,
    ReservationRecord,
    format_gpu_list,
    pod_key,
    pod_request,
)
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


_REMEMBERED_PODS = 256
# Pods between filter and bind: bind is asynchronous in kube-scheduler, so several pods' binds
# can be in flight; far more than ever are at once.
_FILTERED_PODS = 4096


class RefusedError(Exception):
    """A call about a pod the extender will not act on; the message says why."""


def _values(plan: Plan) -> CostTuple:
    return cast(CostTuple, tuple(plan.cost.as_dict().values()))


class Extender:
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
        self._steered: dict[str, float] = {}  # pods left to kube-scheduler's preemption once
        self._scores: dict[str, dict[str, int]] = {}  # pod UID -> node scores from its filter
        self._passed: OrderedDict[str, frozenset[str]] = OrderedDict()  # UID -> nodes passed

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

    def _request_for(self, wire_pod: dict[str, Any]) -> tuple[dict[str, Any], PodRequest]:
        pod = self._known_pod(wire_pod)
        try:
            return pod, pod_request(pod)
        except ObjectError as error:
            raise RefusedError(str(error)) from error

    def _remember_passed(self, uid: str, nodes: list[str]) -> None:
        self._passed[uid] = frozenset(nodes)
        self._passed.move_to_end(uid)
        while len(self._passed) > _FILTERED_PODS:
            self._passed.popitem(last=False)

    # -- filter -----------------------------------------------------------------------------
    def filter(self, args: FilterArgs) -> dict[str, Any]:
        try:
            pod, request = self._request_for(args.pod)
        except RefusedError as error:
            self.metrics.decision("filter", "refused")
            return filter_result([], {}, {}, args, error=str(error))
        result = self._filter(args, pod, request)
        passed = (
            result["NodeNames"]
            if args.nodes is None
            else [n["metadata"]["name"] for n in result["Nodes"]["items"]]
        )
        with self.cache.lock:
            self._remember_passed(request.uid, passed)
        return result

    def _filter(self, args: FilterArgs, pod: dict[str, Any], request: PodRequest) -> dict[str, Any]:
        with self.cache.lock:
            self.cache.tick()
            held = self.cache.snapshot.reservations.get(request.uid)
            if held is not None:
                return self._filter_reserved(request, held, args)
            outcome = filter_nodes(self.cache.snapshot, request, args.node_names)
            result = self._split(outcome, args.node_names)
            if result[0]:
                self._remember_scores(request, outcome)
                self.metrics.decision("filter", "fits")
                return filter_result(*result, args)
            plan = self._choose_plan(request, args)
            if plan is None:
                self.metrics.decision("filter", "preempt-verb")
                why = "tidal prefers a preemption on a node short of GPUs by count"
                return filter_result(*self._all_unresolvable(args, result, why), args)
            if isinstance(plan, NoPlan):
                self.metrics.decision("filter", "no-plan")
                return filter_result(*self._all_unresolvable(args, result, plan.reason), args)
            record = self._reserve(request, plan)
        self.metrics.decision("filter", "evict")
        return self._evict_for(args, pod, request, plan, record)

    def _remember_scores(self, request: PodRequest, outcome: FilterResult) -> None:
        """Score the placements filter found: prioritize follows with the same nodes."""
        nodes = self.cache.snapshot.nodes
        memo: dict[int, int] = {}  # by placement object: filter shares one per node class
        scores = {}
        for name, placement in outcome.feasible.items():
            value = memo.get(id(placement))
            if value is None:
                value = memo[id(placement)] = score(placement, nodes[name].info.shape)
            scores[name] = value
        if len(self._scores) >= _REMEMBERED_PODS:
            self._scores.pop(next(iter(self._scores)))
        self._scores[request.uid] = scores

    def _split(
        self, outcome: FilterResult, names: list[str]
    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
        """Passed nodes in the caller's order, and failures split by whether preemption helps."""
        passed = [n for n in names if n in outcome.feasible]
        failed = {n: r.reason for n, r in outcome.rejected.items() if r.code is Code.UNSCHEDULABLE}
        unresolvable = {
            n: r.reason for n, r in outcome.rejected.items() if r.code is not Code.UNSCHEDULABLE
        }
        for name in unresolvable:
            problem = self.cache.node_problems.get(name)
            if problem is not None:
                unresolvable[name] = problem
        return passed, failed, unresolvable

    def _filter_reserved(
        self, request: PodRequest, held: Reservation, args: FilterArgs
    ) -> dict[str, Any]:
        waiting = [v for v in held.victims if v in self.cache.snapshot.pods]
        if waiting:
            reason = f"waiting for {len(waiting)} victims on node {held.node}"
            self.metrics.decision("filter", "waiting")
            return filter_result([], {}, dict.fromkeys(args.node_names, reason), args)
        others = f"pod holds a GPU reservation on node {held.node}"
        unresolvable = {n: others for n in args.node_names if n != held.node}
        passed = [n for n in args.node_names if n == held.node]
        self.metrics.decision("filter", "reserved")
        return filter_result(passed, {}, unresolvable, args)

    def _all_unresolvable(
        self, args: FilterArgs, result: tuple[list[str], dict[str, str], dict[str, str]], why: str
    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
        # Every node kube-scheduler asks about already has enough GPUs by count, so its own
        # preemption dry run would find no victim there and fail; none may be resolvable.
        _, failed, unresolvable = result
        merged = {n: f"{reason}; {why}" for n, reason in failed.items()}
        return [], {}, {**unresolvable, **merged}

    def _choose_plan(self, request: PodRequest, args: FilterArgs) -> Plan | NoPlan | None:
        """The preemption the extender carries out itself, or None to leave it to
        kube-scheduler's preemption and our preempt verb.

        The nodes kube-scheduler asks about passed its own filters (selectors, taints, GPU
        count), so a plan among them is one the pod may use. A cheaper plan elsewhere can only
        be on a node short of GPUs by count, which kube-scheduler's dry run does see: steer
        there once; if no reservation came of it, the next attempt plans here."""
        snapshot = self.cache.snapshot
        here = self.planner.plan_preemption(snapshot, request, args.node_names)
        if request.uid not in self._steered:
            anywhere = self.planner.plan_preemption(snapshot, request)
            if (
                isinstance(anywhere, Plan)
                and anywhere.node not in set(args.node_names)
                and self._short_by_count(anywhere, request)
                and (isinstance(here, NoPlan) or self._cheaper(anywhere, here))
            ):
                self._steered[request.uid] = snapshot.now
                return None
        self._steered.pop(request.uid, None)
        return here

    def _cheaper(self, a: Plan, b: Plan) -> bool:
        order = self.planner.order
        return order.key(_values(a)) < order.key(_values(b))

    def _short_by_count(self, plan: Plan, request: PodRequest) -> bool:
        state = self.cache.snapshot.nodes[plan.node]
        return state.info.shape.gpu_count - state.used.bit_count() < request.gpus

    def _reserve(self, request: PodRequest, plan: Plan) -> ReservationRecord:
        record = ReservationRecord(
            node=plan.node,
            gpus=tuple(bits(plan.gpus)),
            victims=plan.victims,
            expires_at=self.cache.snapshot.now + self.settings.reservation_ttl_s,
        )
        self.cache.reserve(record.reservation(request.uid))
        self.metrics.preemption(len(plan.victims))
        return record

    def _evict_for(
        self,
        args: FilterArgs,
        pod: dict[str, Any],
        request: PodRequest,
        plan: Plan,
        record: ReservationRecord,
    ) -> dict[str, Any]:
        """Carry out a topology-only preemption: reservation on the pod, then evictions."""
        meta = pod["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        gpus = format_gpu_list(plan.gpus)
        try:
            self.actions.set_reservation(namespace, name, record.to_message())
            for uid in plan.victims:
                self._evict_victim(uid, request, plan, gpus)
        except KubeApiError as error:
            self.cache.release(request.uid)
            self._end_reservation(namespace, name, "PreemptionFailed")
            reason = f"preemption on node {plan.node} failed ({error}); replanning next attempt"
            log.warning("pod %s: %s", request.name, reason)
            return filter_result([], {}, dict.fromkeys(args.node_names, reason), args)
        reason = f"waiting for {len(plan.victims)} victims on node {plan.node}"
        log.info(
            "pod %s: evicting %s on node %s for GPUs %s",
            request.name,
            plan.victims,
            plan.node,
            gpus,
        )
        return filter_result([], {}, dict.fromkeys(args.node_names, reason), args)

    def _evict_victim(self, uid: str, request: PodRequest, plan: Plan, gpus: str) -> None:
        with self.cache.lock:
            victim = self.cache.bound_pod(uid)
        if victim is None:
            return  # already gone
        vmeta = victim["metadata"]
        message = f"preempted by {request.name} (tidal) for GPUs {gpus} on node {plan.node}"
        self.actions.mark_disruption_target(vmeta["namespace"], vmeta["name"], message)
        self.actions.record_event(victim, "Preempted", message)
        self.actions.evict(vmeta["namespace"], vmeta["name"])

    def _end_reservation(self, namespace: str, name: str, reason: str) -> None:
        try:
            self.actions.end_reservation(namespace, name, reason)
        except KubeApiError as error:
            log.warning("could not end reservation on %s/%s: %s", namespace, name, error)

    # -- prioritize -------------------------------------------------------------------------
    def prioritize(self, args: FilterArgs) -> list[dict[str, Any]]:
        try:
            _, request = self._request_for(args.pod)
        except RefusedError:
            return [{"Host": n, "Score": 0} for n in args.node_names]
        with self.cache.lock:
            remembered = self._scores.pop(request.uid, None)
        if remembered is not None and set(args.node_names) <= remembered.keys():
            return [{"Host": n, "Score": remembered[n]} for n in args.node_names]
        scores = []
        with self.cache.lock:
            for name in args.node_names:
                state = self.cache.snapshot.nodes.get(name)
                value = 0
                if state is not None:
                    outcome = fit_node(self.cache.snapshot, state, request)
                    if isinstance(outcome, Placement):
                        value = score(outcome, state.info.shape)
                scores.append({"Host": name, "Score": value})
        return scores

    # -- preempt ----------------------------------------------------------------------------
    def preempt(self, args: PreemptArgs) -> dict[str, Any]:
        try:
            pod, request = self._request_for(args.pod)
        except RefusedError as error:
            log.warning("preempt: %s", error)
            self.metrics.decision("preempt", "refused")
            return preempt_result(None, [], 0)
        with self.cache.lock:
            self.cache.tick()
            held = self.cache.snapshot.reservations.get(request.uid)
            if held is not None:
                # A reservation is being carried out: its victims are terminating. Proposing
                # them again would start a second asynchronous preemption in kube-scheduler,
                # which can swallow the deletion events that requeue the pod; say no instead
                # and let those events bring the pod back.
                self.metrics.decision("preempt", "reserved")
                return preempt_result(None, [], 0)
            candidates = [n for n in args.candidates if n in self.cache.snapshot.nodes]
            plan = self.planner.plan_preemption(self.cache.snapshot, request, candidates)
            if isinstance(plan, NoPlan) or not plan.victims:
                self.metrics.decision("preempt", "no-plan")
                return preempt_result(None, [], 0)
            record = self._reserve(request, plan)
            self._steered.pop(request.uid, None)
        meta = pod["metadata"]
        try:
            self.actions.set_reservation(
                meta.get("namespace", "default"), meta["name"], record.to_message()
            )
        except KubeApiError as error:
            log.warning("pod %s: reservation not recorded on the pod: %s", request.name, error)
        self.metrics.decision("preempt", "plan")
        log.info("pod %s: preempt %s on node %s", request.name, plan.victims, plan.node)
        return preempt_result(plan.node, list(plan.victims), int(plan.cost.pdb_violations))

    # -- bind -------------------------------------------------------------------------------
    def bind(self, args: BindArgs) -> dict[str, Any]:
        wire = {"metadata": {"namespace": args.namespace, "name": args.name, "uid": args.uid}}
        try:
            pod, request = self._request_for(wire)
        except RefusedError as error:
            self.metrics.decision("bind", "refused")
            return {"Error": str(error)}
        with self.cache.lock:
            if args.node not in self._passed.get(args.uid, ()):
                self.metrics.decision("bind", "refused")
                return {"Error": f"node {args.node} did not pass tidal's filter for this pod"}
            held = self.cache.snapshot.reservations.get(request.uid)
            chosen = self._choose_for_bind(request, args.node)
            if isinstance(chosen, str):
                self.metrics.decision("bind", "conflict")
                return {"Error": chosen}
            bound = {**pod, "spec": {**pod["spec"], "nodeName": args.node}}
            self.cache.assume(args.uid, chosen, bound)
        gpus = format_gpu_list(chosen)
        try:
            # One write: the API server copies a Binding's annotations onto the pod, so the pod
            # is never bound without its GPUs (and a stale reservation is blanked with it).
            tier = self.cache.snapshot.nodes[args.node].info.shape.tier_of(chosen).label
            notes = {api.ANNOTATION_GPUS: gpus, api.ANNOTATION_TOPOLOGY_ACHIEVED: tier}
            self.actions.bind(args.namespace, args.name, args.uid, args.node, notes)
        except KubeApiError as error:
            self.cache.delete_pod(args.uid)
            self.cache.upsert_pod(pod)
            self.metrics.decision("bind", "api-error")
            return {"Error": f"binding {pod_key(pod)} to {args.node}: {error}"}
        with self.cache.lock:
            self._passed.pop(args.uid, None)
        if held is not None:
            self._end_reservation(args.namespace, args.name, "Bound")
        self.metrics.decision("bind", "bound")
        log.info("pod %s: bound to %s GPUs %s", request.name, args.node, gpus)
        return {"Error": ""}

    def _choose_for_bind(self, request: PodRequest, node: str) -> int | str:
        """The GPU mask for ``request`` on ``node``, or why there is none now."""
        snapshot = self.cache.snapshot
        state = snapshot.nodes.get(node)
        if state is None:
            return f"node {node} is not in the extender's cache"
        held = snapshot.reservations.get(request.uid)
        free = snapshot.free_gpus(node, request.uid)
        if held is not None and held.node == node and held.gpus & ~free == 0:
            return held.gpus
        outcome = fit_node(snapshot, state, request)
        if isinstance(outcome, Placement):
            return outcome.gpus
        return f"GPUs on node {node} taken meanwhile: {outcome.reason}"

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
            self._end_reservation(meta.get("namespace", "default"), meta["name"], "Expired")
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

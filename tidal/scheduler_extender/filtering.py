"""The filter verb: which of the nodes kube-scheduler passed can take the pod, and what to do
when none can.

Nodes with a free aligned GPU set pass. When none passes, the best preemption is planned once
and kube-scheduler is steered to it: a plan on a node short of GPUs by count is left to
kube-scheduler's own preemption (its dry run sees it and calls the preempt verb); a
topology-only conflict (enough GPUs by count, none aligned) is invisible to that dry run
(kubernetes#139270), so the extender evicts the victims itself and holds the GPUs with a
reservation on the preemptor pod. Every path ends in one :class:`FilterDecision`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from tidal.kubeclient import KubeApiError
from tidal.placement import (
    Code,
    FilterResult,
    NoPlan,
    Plan,
    PodRequest,
    Reservation,
    best_placement,
    filter_nodes,
)
from tidal.placement.cost import CostTuple
from tidal.scheduler_extender.translate import ReservationRecord, format_gpu_list
from tidal.scheduler_extender.wire import FilterArgs

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender

log = logging.getLogger(__name__)
_REMEMBERED_PODS = 256  # pods whose filter scores wait for their prioritize call
# Every FilterDecision outcome (metric labels): nodes passed ("fits"; "reserved": the pod's own
# reservation), or why none did. "refused" is the Extender's (a pod it will not act on).
OUTCOMES = (
    "fits",
    "reserved",
    "waiting",
    "evict",
    "evict-failed",
    "preempt-verb",
    "no-plan",
    "refused",
)
PASSED = frozenset({"fits", "reserved"})


@dataclass(frozen=True)
class FilterDecision:
    """What filter answers: passed nodes in the caller's order, failures split by whether
    preemption may help, or an error; ``outcome`` names the path (a metric label)."""

    outcome: str
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unresolvable: dict[str, str] = field(default_factory=dict)
    error: str = ""
    pod_uid: str | None = None


def decide(
    ext: Extender, args: FilterArgs, pod: dict[str, object], request: PodRequest
) -> FilterDecision:
    with ext.cache.lock:
        found = decide_from_cache(ext, args, pod, request)
        if isinstance(found, FilterDecision):
            return found
        _, failed, unresolvable = _split(ext, found, args.node_names)
        plan = _choose_plan(ext, request, args.node_names)
        if plan is None:
            why = "tidal prefers a preemption on a node short of GPUs by count"
            return _nowhere("preempt-verb", request, failed, unresolvable, why)
        if isinstance(plan, NoPlan):
            return _nowhere("no-plan", request, failed, unresolvable, plan.reason)
        record = ext.reserve(request, plan, pod)
    return _evict_for(ext, args.node_names, pod, request, plan, record)


def decide_from_cache(
    ext: Extender, args: FilterArgs, pod: Mapping[str, Any], request: PodRequest
) -> FilterDecision | FilterResult:
    """The decision when the pod fits now or holds a reservation, from the cache alone (no API
    call, so the server may run it on its event loop); otherwise the filter's result, for
    :func:`decide` to plan a preemption from."""
    with ext.cache.lock:
        ext.cache.tick()
        held = ext.cache.snapshot.reservations.get(request.uid)
        if held is not None:
            return _reserved(ext, request, held, args.node_names)
        # The demand mix the simulator's tidal policy ranks by, learned from the pods filtered
        ext.demand.observe(request)
        mix = ext.demand.mix()
        if not has_soft_preferences(pod):
            # The best node alone, found over the cache's free classes (not node by node),
            # with no failure map: kube-scheduler reads them only to explain a pod that fits
            # nowhere, and at 1,000 nodes they are most of the answer's bytes.
            best = best_placement(ext.cache.snapshot, request, mix, frozenset(args.node_names))
            if best is not None:
                return FilterDecision("fits", [best.node], pod_uid=request.uid)
        outcome = filter_nodes(ext.cache.snapshot, request, args.node_names, mix)
        if not outcome.feasible:
            return outcome
        passed, failed, unresolvable = _split(ext, outcome, args.node_names)
        _remember_scores(ext, request, outcome)
        return FilterDecision("fits", passed, failed, unresolvable, pod_uid=request.uid)


def has_soft_preferences(pod: Mapping[str, Any]) -> bool:
    """Whether the pod asks kube-scheduler's scoring for something: preferred node or pod
    (anti-)affinity, or a ScheduleAnyway spread. Such a pod gets every node that fits, and the
    extender's score is one voice among kube-scheduler's. Any other pod passes on tidal's best
    node alone: kube-scheduler then skips scoring and the prioritize call (a round trip and a
    scoring pass over every node) and binds it there, where otherwise its own scores
    (least-allocated CPU and memory, balanced allocation, image locality: up to several hundred
    points) would outweigh the extender's 0..50 and undo its packing."""
    spec = pod.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    affinity = spec.get("affinity")
    if isinstance(affinity, dict):
        for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity"):
            rules = affinity.get(kind)
            if isinstance(rules, dict) and rules.get(
                "preferredDuringSchedulingIgnoredDuringExecution"
            ):
                return True
    spreads = spec.get("topologySpreadConstraints")
    return isinstance(spreads, list) and any(
        isinstance(c, dict) and c.get("whenUnsatisfiable") == "ScheduleAnyway" for c in spreads
    )


def _split(
    ext: Extender, outcome: FilterResult, names: list[str]
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Passed nodes in the caller's order, and failures split by whether preemption helps."""
    passed = [n for n in names if n in outcome.feasible]
    failed = {n: r.reason for n, r in outcome.rejected.items() if r.code is Code.UNSCHEDULABLE}
    unresolvable = {
        n: ext.cache.node_problems.get(n, r.reason)
        for n, r in outcome.rejected.items()
        if r.code is not Code.UNSCHEDULABLE
    }
    return passed, failed, unresolvable


def _remember_scores(ext: Extender, request: PodRequest, outcome: FilterResult) -> None:
    """Score the placements filter found, in the order it ranks them: prioritize follows with
    the same nodes."""
    if len(ext.scores) >= _REMEMBERED_PODS:
        ext.scores.pop(next(iter(ext.scores)))
    ext.scores[request.uid] = outcome.scores()


def _reserved(
    ext: Extender, request: PodRequest, held: Reservation, names: list[str]
) -> FilterDecision:
    waiting = [v for v in held.victims if v in ext.cache.snapshot.pods]
    if waiting:
        reason = f"waiting for {len(waiting)} victims on node {held.node}"
        return FilterDecision("waiting", unresolvable=dict.fromkeys(names, reason))
    others = f"pod holds a GPU reservation on node {held.node}"
    return FilterDecision(
        "reserved",
        passed=[n for n in names if n == held.node],
        unresolvable={n: others for n in names if n != held.node},
        pod_uid=request.uid,
    )


def _nowhere(
    outcome: str,
    request: PodRequest,
    failed: dict[str, str],
    unresolvable: dict[str, str],
    why: str,
) -> FilterDecision:
    # Every node kube-scheduler asks about already has enough GPUs by count, so its own
    # preemption dry run would find no victim there and fail; none may be resolvable.
    merged = {n: f"{reason}; {why}" for n, reason in failed.items()}
    return FilterDecision(outcome, unresolvable={**unresolvable, **merged})


def _choose_plan(ext: Extender, request: PodRequest, names: list[str]) -> Plan | NoPlan | None:
    """The preemption the extender carries out itself, or None to leave it to
    kube-scheduler's preemption and the preempt verb.

    The nodes kube-scheduler asks about passed its own filters (selectors, taints, GPU
    count), so a plan among them is one the pod may use. A cheaper plan elsewhere can only
    be on a node short of GPUs by count, which kube-scheduler's dry run does see: steer
    there once; if no reservation came of it, the next attempt plans here."""
    snapshot = ext.cache.snapshot
    here = ext.planner.plan_preemption(snapshot, request, names)
    if request.uid not in ext.steered:
        anywhere = ext.planner.plan_preemption(snapshot, request)
        if (
            isinstance(anywhere, Plan)
            and anywhere.node not in set(names)
            and _short_by_count(ext, anywhere, request)
            and (isinstance(here, NoPlan) or _cheaper(ext, anywhere, here))
        ):
            ext.steered[request.uid] = snapshot.now
            return None
    ext.steered.pop(request.uid, None)
    return here


def _values(plan: Plan) -> CostTuple:
    return cast(CostTuple, tuple(plan.cost.as_dict().values()))


def _cheaper(ext: Extender, a: Plan, b: Plan) -> bool:
    order = ext.planner.order
    return order.key(_values(a)) < order.key(_values(b))


def _short_by_count(ext: Extender, plan: Plan, request: PodRequest) -> bool:
    state = ext.cache.snapshot.nodes[plan.node]
    return state.info.shape.gpu_count - state.used.bit_count() < request.gpus


def _evict_for(
    ext: Extender,
    names: list[str],
    pod: dict[str, object],
    request: PodRequest,
    plan: Plan,
    record: ReservationRecord,
) -> FilterDecision:
    """Carry out a topology-only preemption: reservation on the pod, then evictions."""
    meta = cast(dict[str, str], pod["metadata"])
    namespace, name = meta.get("namespace", "default"), meta["name"]
    gpus = format_gpu_list(plan.gpus)
    try:
        ext.actions.set_reservation(namespace, name, record.to_message())
        for uid in plan.victims:
            _evict_victim(ext, uid, request, plan, gpus)
    except KubeApiError as error:
        ext.cache.release(request.uid)
        ext.end_reservation(namespace, name, "PreemptionFailed")
        reason = f"preemption on node {plan.node} failed ({error}); replanning next attempt"
        log.warning("pod %s: %s", request.name, reason)
        return FilterDecision("evict-failed", unresolvable=dict.fromkeys(names, reason))
    log.info(
        "pod %s: evicting %s on node %s for GPUs %s", request.name, plan.victims, plan.node, gpus
    )
    reason = f"waiting for {len(plan.victims)} victims on node {plan.node}"
    return FilterDecision("evict", unresolvable=dict.fromkeys(names, reason))


def _evict_victim(ext: Extender, uid: str, request: PodRequest, plan: Plan, gpus: str) -> None:
    with ext.cache.lock:
        victim = ext.cache.bound_pod(uid)
    if victim is None:
        return  # already gone
    vmeta = victim["metadata"]
    message = f"preempted by {request.name} (tidal) for GPUs {gpus} on node {plan.node}"
    ext.actions.mark_disruption_target(vmeta["namespace"], vmeta["name"], message)
    ext.actions.record_event(victim, "Preempted", message)
    ext.actions.evict(vmeta["namespace"], vmeta["name"])

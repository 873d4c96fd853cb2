"""The preempt verb: kube-scheduler's own preemption found victims on nodes short of GPUs by
count and asks which to take; the answer is the planner's plan on exactly one node (returning
one node forces kube-scheduler's choice), recorded as a reservation like filter's own."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidal.kubeclient import KubeApiError
from tidal.placement import NoPlan, PodRequest
from tidal.scheduler_extender.wire import PreemptArgs

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreemptDecision:
    """The one node and its victims, or no node (kube-scheduler then preempts nothing)."""

    outcome: str
    node: str | None = None
    victims: tuple[str, ...] = ()
    pdb_violations: int = 0


def decide(
    ext: Extender, args: PreemptArgs, pod: dict[str, Any], request: PodRequest
) -> PreemptDecision:
    with ext.cache.lock:
        ext.cache.tick()
        if request.uid in ext.cache.snapshot.reservations:
            # A reservation is being carried out: its victims are terminating. Proposing them
            # again would start a second asynchronous preemption in kube-scheduler, which can
            # swallow the deletion events that requeue the pod; say no instead and let those
            # events bring the pod back.
            return PreemptDecision("reserved")
        candidates = [n for n in args.candidates if n in ext.cache.snapshot.nodes]
        plan = ext.planner.plan_preemption(ext.cache.snapshot, request, candidates)
        if isinstance(plan, NoPlan) or not plan.victims:
            return PreemptDecision("no-plan")
        record = ext.reserve(request, plan, pod)
        ext.steered.pop(request.uid, None)
    meta = pod["metadata"]
    try:
        ext.actions.set_reservation(
            meta.get("namespace", "default"), meta["name"], record.to_message()
        )
    except KubeApiError as error:
        log.warning("pod %s: reservation not recorded on the pod: %s", request.name, error)
    log.info("pod %s: preempt %s on node %s", request.name, plan.victims, plan.node)
    return PreemptDecision("plan", plan.node, plan.victims, int(plan.cost.pdb_violations))

"""The bind verb: choose the GPU set once more under the cache lock (another bind may have
taken GPUs since filter) and bind with it, only to a node tidal's own filter passed for the pod."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidal import api
from tidal.kubeclient import KubeApiError
from tidal.placement import PodRequest, fit_node
from tidal.placement.fit import Placement
from tidal.scheduler_extender.translate import format_gpu_list, pod_key
from tidal.scheduler_extender.wire import BindArgs

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BindDecision:
    """Bound (no error) and the tier the GPUs achieve, or why not."""

    outcome: str
    error: str = ""
    tier: str = ""  # bound: the tier the GPUs achieve (that of their weakest pair)


def decide(ext: Extender, args: BindArgs, pod: dict[str, Any], request: PodRequest) -> BindDecision:
    with ext.cache.lock:
        if args.node not in ext.passed.get(args.uid, ()):
            return BindDecision(
                "refused", f"node {args.node} did not pass tidal's filter for this pod"
            )
        held = ext.cache.snapshot.reservations.get(request.uid)
        chosen = _choose(ext, request, args.node)
        if isinstance(chosen, str):
            return BindDecision("conflict", chosen)
        ext.cache.assume(args.uid, chosen, {**pod, "spec": {**pod["spec"], "nodeName": args.node}})
    gpus = format_gpu_list(chosen)
    try:
        # One write: the API server copies a Binding's annotations onto the pod, so the pod is
        # never bound without its GPUs.
        tier = ext.cache.snapshot.nodes[args.node].info.shape.tier_of(chosen).label
        notes = {api.ANNOTATION_GPUS: gpus, api.ANNOTATION_TOPOLOGY_ACHIEVED: tier}
        ext.actions.bind(args.namespace, args.name, args.uid, args.node, notes)
    except KubeApiError as error:
        ext.cache.delete_pod(args.uid)
        ext.cache.upsert_pod(pod)
        return BindDecision("api-error", f"binding {pod_key(pod)} to {args.node}: {error}")
    with ext.cache.lock:
        ext.passed.pop(args.uid, None)
    if held is not None:
        ext.end_reservation(args.namespace, args.name, "Bound")
    log.info("pod %s: bound to %s GPUs %s", request.name, args.node, gpus)
    return BindDecision("bound", tier=tier)


def _choose(ext: Extender, request: PodRequest, node: str) -> int | str:
    """The GPU mask for ``request`` on ``node``: its reserved set if it holds one there, else
    the best fit; or why there is none now."""
    snapshot = ext.cache.snapshot
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

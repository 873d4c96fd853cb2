"""The web view's snapshot from the extender's cache: the GPU pool as the metrics see it
(``pool.gpu_pool`` over the same ``PoolInputs``), the reservations, the latest preemptions and the
pending pods with the reasons ``tidal_extender_pending_pods`` counts. Read under the cache lock
once, computed outside it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tidal.scheduler_extender.pool import Holder, NodeGpus, PoolInputs, gpu_pool
from tidal.scheduler_extender.translate import pod_key, timestamp
from tidal.topology import bits
from tidal.webview.snapshot import (
    GpuView,
    NodeView,
    PendingPod,
    ReservationView,
    Snapshot,
)

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender


def build_snapshot(extender: Extender) -> Snapshot:
    with extender.cache.lock:  # one consistent view: pool, pending outcomes, preemptions
        inputs = extender.cache.pool_inputs()
        outcomes = extender.pending_outcomes()
        preemptions = tuple(reversed(extender.preemptions))
        now = extender.cache.clock()
    return Snapshot(
        source="extender",
        time=now,
        nodes=tuple(_node_view(node) for node in gpu_pool(inputs)),
        reservations=_reservations(inputs),
        preemptions=preemptions,
        pending=_pending(inputs.pending, outcomes, now),
    )


def _node_view(node: NodeGpus) -> NodeView:
    gpus = tuple(
        _gpu_view(index, state.label, holder)
        for index, (state, holder) in enumerate(zip(node.states, node.holders, strict=True))
    )
    return NodeView(node.node, gpus)


def _gpu_view(index: int, state: str, holder: Holder | None) -> GpuView:
    if holder is None:
        return GpuView(index, state)
    return GpuView(
        index,
        state,
        holder.klass,
        holder.tier,
        holder.namespace,
        holder.pod,
        holder.workload,
        holder.mode,
    )


def _reservations(inputs: PoolInputs) -> tuple[ReservationView, ...]:
    views = [
        ReservationView(
            _name_of(inputs.pending.get(reservation.preemptor), reservation.preemptor),
            reservation.node,
            tuple(bits(reservation.gpus)),
        )
        for reservation in inputs.reservations
    ]
    return tuple(sorted(views, key=lambda view: (view.node, view.gpus)))


def _pending(
    pods: Mapping[str, Mapping[str, Any]], outcomes: Mapping[str, str], now: float
) -> tuple[PendingPod, ...]:
    views = [
        PendingPod(_name_of(pods.get(uid), uid), reason, _waiting_s(pods.get(uid), now))
        for uid, reason in outcomes.items()
    ]
    return tuple(sorted(views, key=lambda view: (-view.waiting_s, view.pod)))


def _name_of(pod: Mapping[str, Any] | None, uid: str) -> str:
    """``namespace/name`` of a pod the cache holds, else its UID."""
    return pod_key(dict(pod)) if pod is not None else uid


def _waiting_s(pod: Mapping[str, Any] | None, now: float) -> float:
    """Seconds since the pod was created (0 when its creationTimestamp cannot be read)."""
    meta = (pod or {}).get("metadata")
    created = timestamp(meta.get("creationTimestamp")) if isinstance(meta, dict) else None
    return max(0.0, now - created) if created is not None else 0.0

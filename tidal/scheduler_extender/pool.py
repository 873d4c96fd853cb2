"""The GPU pool as the extender's cache sees it, GPU by GPU (pure): who holds or has reserved
each GPU, its state, and the pool's totals. The metrics collector reads it at scrape time, so
what Prometheus sees is always one consistent view and a GPU, pod or node that goes takes its
series with it.

A GPU's state, by precedence: unhealthy (its node agent says so, whoever holds it), reserved
(a preemptor's plan holds it, even while a victim still runs on it), batch (held by a pod of
PriorityClass tidal-batch), online (held by any other pod: tidal-online, or a PriorityClass
that is not tidal's), free.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tidal import api
from tidal.placement import NodeState, Reservation
from tidal.topology import NodeShape, bits


class GpuState(enum.IntEnum):
    """A GPU's state; the value is ``tidal_gpu_state``'s sample value."""

    FREE = 0
    BATCH = 1
    ONLINE = 2
    RESERVED = 3
    UNHEALTHY = 4

    @property
    def label(self) -> str:
        return self.name.lower()


# A pod's class, from its PriorityClass: tidal's two, or anything else.
CLASS_ONLINE, CLASS_BATCH, CLASS_OTHER = "online", "batch", "other"
_CLASSES = {api.PRIORITY_CLASS_ONLINE: CLASS_ONLINE, api.PRIORITY_CLASS_BATCH: CLASS_BATCH}


def pod_class(pod: Mapping[str, Any] | None) -> str:
    """``online`` (PriorityClass tidal-online), ``batch`` (tidal-batch) or ``other``."""
    name = _section(pod, "spec").get("priorityClassName")
    return _CLASSES.get(name, CLASS_OTHER) if isinstance(name, str) else CLASS_OTHER


@dataclass(frozen=True, slots=True)
class Holder:
    """The pod holding (or, for a reserved GPU, the preemptor waiting for) a GPU."""

    namespace: str
    pod: str
    workload: str  # the owning LLMService / LLMBatchJob (tidal.dev labels), else the pod
    klass: str  # online | batch | other
    tier: str  # the pod's tidal.dev/topology-tier annotation, "" without one
    mode: str = ""  # its tidal.dev/topology-mode (guaranteed, best-effort, none), "" without

    @staticmethod
    def of(pod: Mapping[str, Any] | None, fallback: str) -> Holder:
        """A holder from the raw pod; ``fallback`` ("namespace/name") names a pod the cache
        holds no object for."""
        meta = _section(pod, "metadata")
        namespace, _, name = fallback.partition("/")
        namespace = _text(meta.get("namespace")) or namespace
        name = _text(meta.get("name")) or name
        labels, notes = _section(meta, "labels"), _section(meta, "annotations")
        owner = _text(labels.get(api.LABEL_LLMSERVICE)) or _text(labels.get(api.LABEL_LLMBATCHJOB))
        tier = _text(notes.get(api.ANNOTATION_TOPOLOGY_TIER))
        mode = _text(notes.get(api.ANNOTATION_TOPOLOGY_MODE))
        return Holder(namespace, name, owner or name, pod_class(pod), tier, mode)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _section(obj: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """``obj[key]`` when it is an object, else empty (watched objects are read defensively)."""
    value = (obj or {}).get(key)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class NodeGpus:
    """One node's GPUs: each one's state and holder (None for free or fenced GPUs)."""

    node: str
    shape: NodeShape
    states: tuple[GpuState, ...]
    holders: tuple[Holder | None, ...]

    @property
    def free_mask(self) -> int:
        return sum(1 << i for i, s in enumerate(self.states) if s is GpuState.FREE)


@dataclass(frozen=True)
class PoolInputs:
    """What the view is computed from, copied from the cache under its lock (node states are
    immutable; the dictionaries are copies), so the computation runs outside it."""

    nodes: tuple[NodeState, ...]
    unhealthy: Mapping[str, int]  # node -> mask of GPUs its agent reports unhealthy
    reservations: tuple[Reservation, ...]
    bound: Mapping[str, Mapping[str, Any]]  # UID -> raw bound pod
    pending: Mapping[str, Mapping[str, Any]]  # UID -> raw unbound pod


def gpu_pool(inputs: PoolInputs) -> list[NodeGpus]:
    """Every GPU of every node the cache knows, by node name."""
    reserved = _reserved_by_node(inputs.reservations, inputs.pending)
    return [
        _node_gpus(state, inputs.unhealthy.get(state.name, 0), reserved.get(state.name, {}), inputs)
        for state in sorted(inputs.nodes, key=lambda s: s.name)
    ]


def _reserved_by_node(
    reservations: Iterable[Reservation], pending: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[int, Holder]]:
    out: dict[str, dict[int, Holder]] = {}
    for reservation in reservations:
        holder = Holder.of(pending.get(reservation.preemptor), f"/{reservation.preemptor}")
        for gpu in bits(reservation.gpus):
            out.setdefault(reservation.node, {})[gpu] = holder
    return out


def _node_gpus(
    state: NodeState, unhealthy: int, reserved: Mapping[int, Holder], inputs: PoolInputs
) -> NodeGpus:
    count = state.info.shape.gpu_count
    by_pod = [
        None if _is_fence(pod.uid) else Holder.of(inputs.bound.get(pod.uid), pod.name)
        for pod in state.pods
    ]
    holders = [by_pod[owner] if owner >= 0 else None for owner in state.owner]
    for gpu, holder in reserved.items():
        if gpu < count:
            holders[gpu] = holder
    states = tuple(
        _state(unhealthy >> gpu & 1 == 1, gpu in reserved, holders[gpu]) for gpu in range(count)
    )
    return NodeGpus(state.name, state.info.shape, states, tuple(holders))


def _state(unhealthy: bool, reserved: bool, holder: Holder | None) -> GpuState:
    if unhealthy:
        return GpuState.UNHEALTHY
    if reserved:
        return GpuState.RESERVED
    if holder is None:
        return GpuState.FREE
    return GpuState.BATCH if holder.klass == CLASS_BATCH else GpuState.ONLINE


def _is_fence(uid: str) -> bool:
    """The cache's pseudo-pods that hold unhealthy GPUs (see ClusterCache._fence)."""
    return uid.startswith(FENCE_PREFIX)


FENCE_PREFIX = api.PREFIX + "unhealthy-gpus/"


def state_counts(pool: Iterable[NodeGpus]) -> dict[GpuState, int]:
    """GPUs per state over the pool (every state, 0 included)."""
    counts = dict.fromkeys(GpuState, 0)
    for node in pool:
        for state in node.states:
            counts[state] += 1
    return counts


def intact_capacity_ratio(pool: Iterable[NodeGpus]) -> float:
    """The simulator's M9 intact capacity over the extender's pool: the aligned capacity the
    free GPUs keep whole (``NodeShape.tier_intact_value``: the sum of |d|² over the largest
    sets d satisfying some tier, entirely free), as a share of an empty pool's. 1.0: every GPU
    free; it falls as GPUs are held and as the free ones scatter across domains. Reserved and
    unhealthy GPUs are not free. 0 for an empty pool."""
    kept = whole = 0
    for node in pool:
        kept += node.shape.tier_intact_value(node.free_mask)
        whole += node.shape.tier_intact_value(node.shape.full_mask)
    return kept / whole if whole else 0.0

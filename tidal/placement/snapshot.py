"""The cluster snapshot the placement core reads: nodes, running pods, PDBs, reservations.

Per-node derived state (:class:`NodeState`) is rebuilt only when that node's pods change, so the
hot path reads precomputed masks and prefix tables (Koordinator habit: precompute when the world
changes, not per request).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidal.topology import NodeShape, bits

NON_PREEMPTIBLE = 2**62  # effective priority of a pod that may never be a victim


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A running (bound) pod as the scheduler sees it. ``gpus`` is a mask on its node."""

    uid: str
    name: str
    node: str
    gpus: int
    priority: int
    cpu_milli: int = 0
    memory_mib: int = 0
    preemptible: bool = True
    pdb: str | None = None
    gang: str | None = None
    workload: str | None = None
    start_time: float = 0.0
    last_checkpoint: float | None = None
    checkpoint_interval_s: float | None = None  # periodic checkpoints since start, if known

    @property
    def gpu_count(self) -> int:
        return self.gpus.bit_count()

    @property
    def effective_priority(self) -> int:
        return self.priority if self.preemptible else NON_PREEMPTIBLE

    def last_saved(self, now: float) -> float:
        """When the pod's work was last safe at ``now``: its latest checkpoint (recorded, or
        due by its checkpoint interval), else its start."""
        saved = self.start_time if self.last_checkpoint is None else self.last_checkpoint
        interval = self.checkpoint_interval_s
        if interval and now > self.start_time:
            saved = max(saved, self.start_time + (now - self.start_time) // interval * interval)
        return saved

    def latest_saved_bound(self) -> float:
        """An upper bound on :meth:`last_saved` at any time (for time-free lower bounds)."""
        if self.checkpoint_interval_s:
            return float("inf")
        return self.start_time if self.last_checkpoint is None else self.last_checkpoint

    def lost_work(self, now: float) -> float:
        """GPU-seconds of work lost if evicted now: GPUs × time since the last checkpoint."""
        return self.gpu_count * max(0.0, now - self.last_saved(now))


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node: its compiled GPU shape, allocatable CPU and memory, labels and rack domain."""

    name: str
    shape: NodeShape
    cpu_milli: int
    memory_mib: int
    nvlink_domain: str | None = None
    rack: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PdbInfo:
    """A PodDisruptionBudget reduced to what preemption needs: how many pods may still go."""

    name: str
    disruptions_allowed: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """A preemptor's claim: the GPUs it will take on ``node`` once ``victims`` are gone."""

    preemptor: str
    node: str
    gpus: int
    victims: frozenset[str]
    expires_at: float


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node plus the derived facts about the pods on it."""

    info: NodeInfo
    pods: tuple[PodInfo, ...]  # by effective priority, highest first
    used: int
    cpu_used: int
    memory_used: int
    owner: tuple[int, ...]  # per GPU: index into pods, -1 when free
    neg_priority: tuple[int, ...]  # -effective priority of pods, ascending (for bisect)
    protected_prefix: tuple[int, ...]  # GPU mask of pods[:i]
    cpu_prefix: tuple[int, ...]  # CPU of pods[:i]
    memory_prefix: tuple[int, ...]
    # Over the GPU-holding pods among pods[i:]: the lowest priority and the latest checkpoint
    # (or start), so a planner can bound the cost of evicting any of them in O(1).
    min_priority_suffix: tuple[int, ...]
    # (shape, free GPU mask): nodes of one class get the same GPU choice for any request
    free_class: tuple[NodeShape, int]
    memo: dict[object, Any] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(info: NodeInfo, pods: Iterable[PodInfo]) -> NodeState:
        ordered = tuple(sorted(pods, key=lambda p: (-p.effective_priority, p.uid)))
        owner = [-1] * info.shape.gpu_count
        used = 0
        for index, pod in enumerate(ordered):
            used |= pod.gpus
            for gpu in bits(pod.gpus):
                owner[gpu] = index
        return NodeState(
            info=info,
            pods=ordered,
            used=used,
            cpu_used=sum(p.cpu_milli for p in ordered),
            memory_used=sum(p.memory_mib for p in ordered),
            owner=tuple(owner),
            neg_priority=tuple(-p.effective_priority for p in ordered),
            protected_prefix=_prefix(ordered, lambda p: p.gpus, lambda a, b: a | b),
            cpu_prefix=_prefix(ordered, lambda p: p.cpu_milli, lambda a, b: a + b),
            memory_prefix=_prefix(ordered, lambda p: p.memory_mib, lambda a, b: a + b),
            min_priority_suffix=_suffix(ordered, lambda p: p.priority, min, NON_PREEMPTIBLE),
            free_class=(info.shape, info.shape.full_mask & ~used),
        )

    @property
    def name(self) -> str:
        return self.info.name

    def protected_count(self, priority: int) -> int:
        """How many pods (a prefix of ``pods``) a preemptor of ``priority`` may not evict."""
        return bisect.bisect_right(self.neg_priority, -priority)

    def saved_prefix(self, keep: int) -> list[float]:
        """Over the GPUs held by pods[keep:], youngest first (latest checkpoint or start):
        prefix sums of those times. Freeing k of them loses at least k·now − saved[k]."""
        key = ("saved", keep)
        if key not in self.memo:
            saved = sorted(
                (p.latest_saved_bound() for p in self.pods[keep:] for _ in range(p.gpu_count)),
                reverse=True,
            )
            prefix = [0.0]
            for time_saved in saved:
                prefix.append(prefix[-1] + time_saved)
            self.memo[key] = prefix
        return self.memo[key]  # type: ignore[no-any-return]

    def cpu_free(self) -> int:
        return self.info.cpu_milli - self.cpu_used

    def memory_free(self) -> int:
        return self.info.memory_mib - self.memory_used


def _suffix(
    pods: tuple[PodInfo, ...],
    value: Callable[[PodInfo], Any],
    combine: Callable[[Any, Any], Any],
    empty: Any,
) -> tuple[Any, ...]:
    out = [empty]
    for pod in reversed(pods):
        out.append(combine(out[-1], value(pod)) if pod.gpus else out[-1])
    return tuple(reversed(out))


def _prefix(pods: tuple[PodInfo, ...], value: object, combine: object) -> tuple[int, ...]:
    out = [0]
    for pod in pods:
        out.append(combine(out[-1], value(pod)))  # type: ignore[operator]
    return tuple(out)


class ClusterSnapshot:
    """Nodes, pods, PDBs and reservations at time ``now``.

    Mutations (:meth:`add_pod`, :meth:`remove_pod`, :meth:`reserve`, ...) rebuild only the
    touched node's state, so the simulator and the extender's cache can keep one snapshot live.
    """

    def __init__(
        self,
        nodes: Iterable[NodeInfo],
        pods: Iterable[PodInfo] = (),
        pdbs: Iterable[PdbInfo] = (),
        reservations: Iterable[Reservation] = (),
        now: float = 0.0,
    ) -> None:
        self.now = now
        self.nodes: dict[str, NodeState] = {}
        self.pods: dict[str, PodInfo] = {}
        self.pdbs: dict[str, PdbInfo] = {p.name: p for p in pdbs}
        self.reservations: dict[str, Reservation] = {}
        self.gangs: dict[str, set[str]] = {}
        self._blocked: dict[str, dict[str, int]] = {}
        self._promised: dict[str, str] = {}
        self._classes: dict[tuple[NodeShape, int], list[str]] = {}
        by_node: dict[str, list[PodInfo]] = {}
        for pod in pods:
            self._index_pod(pod)
            by_node.setdefault(pod.node, []).append(pod)
        for info in nodes:
            self._put(NodeState.build(info, by_node.pop(info.name, [])))
        if by_node:
            raise ValueError(f"pods on unknown nodes: {sorted(by_node)}")
        for reservation in reservations:
            self.reserve(reservation)

    def copy(self) -> ClusterSnapshot:
        """A snapshot that can be changed without touching this one (node states are shared)."""
        clone = ClusterSnapshot.__new__(ClusterSnapshot)
        clone.now = self.now
        clone.nodes = dict(self.nodes)
        clone.pods = dict(self.pods)
        clone.pdbs = dict(self.pdbs)
        clone.reservations = dict(self.reservations)
        clone.gangs = {g: set(m) for g, m in self.gangs.items()}
        clone._blocked = {n: dict(b) for n, b in self._blocked.items()}
        clone._promised = dict(self._promised)
        clone._classes = {key: list(names) for key, names in self._classes.items()}
        return clone

    # -- queries ---------------------------------------------------------------------------

    def has_blocks(self) -> bool:
        """Whether any node has GPUs blocked by reservations (lets hot loops skip the check)."""
        return bool(self._blocked)

    def blocked_for(self, node: str, preemptor: str | None) -> int:
        """GPUs on ``node`` that ``preemptor`` may neither take nor free: those reserved for
        other preemptors and those of pods already promised to them as victims."""
        by_preemptor = self._blocked.get(node)
        if not by_preemptor:
            return 0
        mask = 0
        for owner, gpus in by_preemptor.items():
            if owner != preemptor:
                mask |= gpus
        return mask

    def blocked_nodes(self) -> Mapping[str, object]:
        """Nodes with GPUs blocked by reservations (their free set depends on who asks)."""
        return self._blocked

    def free_classes(self) -> Mapping[tuple[NodeShape, int], list[str]]:
        """Nodes grouped by (shape, free GPU mask before reservations), names sorted. Nodes in
        one class are interchangeable for GPU fit, so placement scans classes, not nodes."""
        return self._classes

    def promised_to(self, pod_uid: str) -> str | None:
        """The preemptor a pod is already promised to as a victim, if any."""
        return self._promised.get(pod_uid)

    def evictable(self, pod: PodInfo, preemptor: str, priority: int) -> bool:
        """Whether ``preemptor`` (of ``priority``) may evict ``pod``: lower priority,
        preemptible, and not already promised to another preemptor."""
        promised = self._promised.get(pod.uid)
        return pod.effective_priority < priority and promised in (None, preemptor)

    def gang_members(self, gang: str) -> set[str]:
        return self.gangs.get(gang, set())

    def free_gpus(self, node: str, preemptor: str | None = None) -> int:
        state = self.nodes[node]
        return state.info.shape.full_mask & ~state.used & ~self.blocked_for(node, preemptor)

    # -- changes ---------------------------------------------------------------------------

    def add_pod(self, pod: PodInfo) -> None:
        state = self.nodes[pod.node]
        if pod.gpus & state.used:
            raise ValueError(f"pod {pod.name}: GPUs {bits(pod.gpus & state.used)} already in use")
        if pod.gpus & ~state.info.shape.full_mask:
            raise ValueError(f"pod {pod.name}: GPU index beyond node {pod.node}'s GPUs")
        self._index_pod(pod)
        self._put(NodeState.build(state.info, (*state.pods, pod)))

    def set_node(self, info: NodeInfo) -> None:
        """Add a node, or replace its facts (shape, allocatable, labels) keeping its pods."""
        state = self.nodes.get(info.name)
        pods = state.pods if state is not None else ()
        for pod in pods:
            if pod.gpus & ~info.shape.full_mask:
                raise ValueError(f"node {info.name}: pod {pod.name} holds GPUs the node lost")
        self._put(NodeState.build(info, pods))

    def remove_node(self, name: str) -> list[PodInfo]:
        """Forget a node and the pods bound to it; returns those pods."""
        state = self.nodes.get(name)
        if state is None:
            return []
        removed = [self.remove_pod(pod.uid) for pod in state.pods]
        self._unclass(self.nodes.pop(name))
        self._blocked.pop(name, None)
        return removed

    def remove_pod(self, uid: str) -> PodInfo:
        pod = self.pods.pop(uid)
        if pod.gang:
            self.gangs[pod.gang].discard(uid)
        state = self.nodes[pod.node]
        self._put(NodeState.build(state.info, (p for p in state.pods if p.uid != uid)))
        promised_to = self._promised.get(uid)
        if promised_to is not None:
            # its GPUs are free now; only the preemptor's reserved set stays blocked
            self._blocked.pop(pod.node, None)
            for other in self.reservations.values():
                self._block(other, {pod.node})
        return pod

    def reserve(self, reservation: Reservation) -> None:
        """Record a preemptor's plan: its GPUs and victims are off limits to everyone else."""
        self.release(reservation.preemptor)
        self.reservations[reservation.preemptor] = reservation
        for victim in reservation.victims:
            self._promised[victim] = reservation.preemptor
        self._reindex_blocked(reservation)

    def release(self, preemptor: str) -> Reservation | None:
        reservation = self.reservations.pop(preemptor, None)
        if reservation is None:
            return None
        for victim in reservation.victims:
            if self._promised.get(victim) == preemptor:
                del self._promised[victim]
        self._reindex_blocked(reservation)
        return reservation

    def _reindex_blocked(self, reservation: Reservation) -> None:
        nodes = {reservation.node}
        nodes.update(self.pods[v].node for v in reservation.victims if v in self.pods)
        for node in nodes:
            self._blocked.pop(node, None)
        for other in self.reservations.values():
            self._block(other, nodes)

    def _block(self, reservation: Reservation, nodes: set[str]) -> None:
        def add(node: str, gpus: int) -> None:
            if node in nodes and gpus:
                by_preemptor = self._blocked.setdefault(node, {})
                by_preemptor[reservation.preemptor] = (
                    by_preemptor.get(reservation.preemptor, 0) | gpus
                )

        add(reservation.node, reservation.gpus)
        for victim in reservation.victims:
            pod = self.pods.get(victim)
            if pod is not None:
                add(pod.node, pod.gpus)

    def expire_reservations(self) -> list[Reservation]:
        """Drop reservations whose expiry has passed; returns them."""
        stale = [r for r in self.reservations.values() if r.expires_at <= self.now]
        for reservation in stale:
            self.release(reservation.preemptor)
        return stale

    def _put(self, state: NodeState) -> None:
        """Store a node's rebuilt state and move it to its free class."""
        old = self.nodes.get(state.name)
        if old is not None:
            if old.used == state.used and old.info.shape is state.info.shape:
                self.nodes[state.name] = state
                return
            self._unclass(old)
        self.nodes[state.name] = state
        names = self._classes.setdefault(_class_key(state), [])
        bisect.insort(names, state.name)

    def _unclass(self, state: NodeState) -> None:
        key = _class_key(state)
        names = self._classes[key]
        del names[bisect.bisect_left(names, state.name)]
        if not names:
            del self._classes[key]

    def _index_pod(self, pod: PodInfo) -> None:
        if pod.uid in self.pods:
            raise ValueError(f"duplicate pod uid {pod.uid}")
        self.pods[pod.uid] = pod
        if pod.gang:
            self.gangs.setdefault(pod.gang, set()).add(pod.uid)


def _class_key(state: NodeState) -> tuple[NodeShape, int]:
    return state.free_class

"""Topology-first minimum-cost preemption (SCHEDULING.md §4).

With whole, exclusive GPUs, choosing the target GPU set S fixes the victims: every pod holding
a GPU in S. So minimising the cost key over the aligned target sets S of every node is exact, and
cheap (an 8-GPU node has at most C(8,4) = 70 sets of 4). Nodes are screened in O(1) with
precomputed prefix tables, then evaluated best lower bound first; a node whose lower bound
exceeds the best plan found is never evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tidal.placement import status
from tidal.placement.cost import DEFAULT_ORDER, NO_VICTIM_PRIORITY, Cost, CostOrder, CostTuple
from tidal.placement.fit import best_placement, static_rejection
from tidal.placement.plan import NoPlan, Plan, PlanResult
from tidal.placement.request import PodRequest, TopologyMode
from tidal.placement.snapshot import ClusterSnapshot, NodeState, PodInfo
from tidal.placement.status import Code
from tidal.topology import NodeShape, bits

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class _Victims:
    """What evicting one victim set costs, independent of the GPU set it frees."""

    pdb_violations: int
    max_priority: int
    lost_work: float
    pods: int
    workloads: int
    gpus_freed: int  # on every node (a gang may span nodes)
    node_mask: int  # GPUs freed on the planned node
    uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Screened:
    state: NodeState
    protected: int  # GPUs the preemptor may not take or free
    bound: tuple[float, ...]


class TopologyFirstPlanner:
    """Our planner: exact over aligned target sets, lexicographic cost key, deadline-bounded."""

    name = "tidal"

    def __init__(
        self,
        order: CostOrder = DEFAULT_ORDER,
        deadline_s: float = 0.05,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.order = order
        self.deadline_s = deadline_s
        self.clock = clock

    def plan(
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        nodes: Iterable[str] | None = None,
    ) -> PlanResult:
        """The cheapest preemption that places ``request``, or why there is none."""
        if best_placement(snapshot, request) is not None:
            return NoPlan(self.name, status.FITS_WITHOUT_PREEMPTION, Code.SUCCESS)
        return self.plan_preemption(snapshot, request, nodes)

    def plan_preemption(
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        nodes: Iterable[str] | None = None,
    ) -> PlanResult:
        """Like :meth:`plan` without first looking for a free placement."""
        started = self.clock()
        names = snapshot.nodes.keys() if nodes is None else nodes
        screened = [s for n in names if (s := self._screen(snapshot, request, n)) is not None]
        if not screened:
            detail = "every node lacks GPUs, CPU or memory held by lower-priority preemptible pods"
            return NoPlan(self.name, status.NO_CANDIDATE.format(detail=detail), Code.UNRESOLVABLE)
        screened.sort(key=lambda s: s.bound)
        return self._search(snapshot, request, screened, started)

    def _search(
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        screened: list[_Screened],
        started: float,
    ) -> PlanResult:
        best: tuple[tuple[float, ...], str, int, _Victims, CostTuple] | None = None
        evaluated = 0
        for candidate in screened:
            if best is not None and candidate.bound > best[0]:
                break  # bounds are sorted: no later node can beat the best plan
            if self.clock() - started > self.deadline_s:
                return self._result(best, snapshot, evaluated, deadline_hit=True)
            evaluated += 1
            found = self._evaluate(snapshot, request, candidate)
            if found is not None and (best is None or found[:3] < best[:3]):
                best = found
        return self._result(best, snapshot, evaluated, deadline_hit=False)

    def _result(
        self,
        best: tuple[tuple[float, ...], str, int, _Victims, CostTuple] | None,
        snapshot: ClusterSnapshot,
        evaluated: int,
        deadline_hit: bool,
    ) -> PlanResult:
        if best is None:
            reason = (
                status.DEADLINE.format(ms=self.deadline_s * 1000, nodes=evaluated)
                if deadline_hit
                else status.NO_CANDIDATE.format(detail=status.PROTECTED)
            )
            return NoPlan(self.name, reason, Code.UNSCHEDULABLE, evaluated, deadline_hit)
        _, node, gpus, victims, values = best
        shape = snapshot.nodes[node].info.shape
        return Plan(
            policy=self.name,
            node=node,
            gpus=gpus,
            tier=shape.tier_of(gpus),
            victims=victims.uids,
            cost=Cost.of(values),
            nodes_evaluated=evaluated,
            deadline_hit=deadline_hit,
        )

    # -- screening: O(1) per node from the node's prefix tables -----------------------------

    def _screen(
        self, snapshot: ClusterSnapshot, request: PodRequest, name: str
    ) -> _Screened | None:
        state = snapshot.nodes.get(name)
        if state is None or static_rejection(state, request) is not None:
            return None
        shape = state.info.shape
        keep = state.protected_count(request.priority)
        protected = state.protected_prefix[keep] | snapshot.blocked_for(name, request.uid)
        avail = shape.full_mask & ~protected
        if request.aligned_only:
            if not shape.has_aligned(request.gpus, request.tier)[avail]:
                return None
        elif avail.bit_count() < request.gpus:
            return None
        cpu_evictable = state.cpu_used - state.cpu_prefix[keep]
        memory_evictable = state.memory_used - state.memory_prefix[keep]
        if request.cpu_milli > state.cpu_free() + cpu_evictable:
            return None
        if request.memory_mib > state.memory_free() + memory_evictable:
            return None
        bound = self._lower_bound(snapshot, request, state, keep, avail)
        return _Screened(state, protected, bound)

    def _lower_bound(
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        state: NodeState,
        keep: int,
        avail: int,
    ) -> tuple[float, ...]:
        """A cost no plan on this node can undercut, component by component."""
        shape = state.info.shape
        free = snapshot.free_gpus(state.name, request.uid)
        needs_victim = not _holds_set(shape, free, request)
        min_priority = NO_VICTIM_PRIORITY
        min_lost = 0.0
        if needs_victim:
            evictable = [p for p in state.pods[keep:] if p.gpus]
            min_priority = min(p.priority for p in evictable)
            min_lost = min(p.lost_work(snapshot.now) for p in evictable)
        candidates = _candidate_sets(shape, request)
        values: CostTuple = (
            0,
            min_priority,
            0,
            min_lost,
            int(needs_victim),
            int(needs_victim),
            0,
            -shape.intact_value(avail),
            -shape.quality[candidates[0]],
            -(2**62),
        )
        return self.order.key(values)

    # -- exact evaluation of one node ------------------------------------------------------

    def _evaluate(
        self, snapshot: ClusterSnapshot, request: PodRequest, candidate: _Screened
    ) -> tuple[tuple[float, ...], str, int, _Victims, CostTuple] | None:
        state = candidate.state
        shape = state.info.shape
        free = snapshot.free_gpus(state.name, request.uid)
        by_victims: dict[int, _Victims | None] = {}
        best: tuple[tuple[float, ...], str, int, _Victims, CostTuple] | None = None
        for target in _candidate_sets(shape, request):
            if target & candidate.protected:
                continue
            occupied = target & state.used
            victim_mask = _owners(state, occupied)
            if victim_mask not in by_victims:
                by_victims[victim_mask] = _victims(snapshot, request, state, victim_mask)
            victims = by_victims[victim_mask]
            if victims is None or not victims.pods:
                continue  # infeasible, or a free fit that is not a preemption
            values: CostTuple = (
                victims.pdb_violations,
                victims.max_priority,
                0 if request.mode is TopologyMode.NONE else shape.shortfall(target, request.tier),
                victims.lost_work,
                victims.pods,
                victims.workloads,
                victims.gpus_freed - occupied.bit_count(),
                -shape.intact_value((free | victims.node_mask) & ~target),
                -shape.quality[target],
                -shape.bottleneck[target],
            )
            found = (self.order.key(values), state.name, target, victims, values)
            if best is None or found[:3] < best[:3]:
                best = found
        return best


def _candidate_sets(shape: NodeShape, request: PodRequest) -> tuple[int, ...]:
    if request.aligned_only:
        return shape.aligned_sets(request.gpus, request.tier)
    return shape.subsets(request.gpus)


def _holds_set(shape: NodeShape, free: int, request: PodRequest) -> bool:
    if request.aligned_only:
        return bool(shape.has_aligned(request.gpus, request.tier)[free])
    return free.bit_count() >= request.gpus


def _owners(state: NodeState, gpus: int) -> int:
    """Bitmask over ``state.pods`` of the pods holding any GPU in ``gpus``."""
    owners = 0
    owner = state.owner
    while gpus:
        low = gpus & -gpus
        owners |= 1 << owner[low.bit_length() - 1]
        gpus ^= low
    return owners


def _victims(
    snapshot: ClusterSnapshot, request: PodRequest, state: NodeState, victim_mask: int
) -> _Victims | None:
    """Cost facts of evicting the pods in ``victim_mask`` (plus their gangs, plus CPU/memory
    extras if needed); None when that is impossible."""
    pods = {p.uid: p for p in (state.pods[i] for i in bits(victim_mask))}
    if not _add_gangs(snapshot, request, pods):
        return None
    if not _add_resource_extras(snapshot, request, state, pods):
        return None
    return _summarise(snapshot, state, pods)


def _add_gangs(snapshot: ClusterSnapshot, request: PodRequest, pods: dict[str, PodInfo]) -> bool:
    """Never break a gang without counting it whole: add every member, or refuse."""
    for gang in {p.gang for p in pods.values() if p.gang}:
        for uid in snapshot.gang_members(gang):
            member = snapshot.pods[uid]
            if not snapshot.evictable(member, request.uid, request.priority):
                return False
            pods[uid] = member
    return True


def _add_resource_extras(
    snapshot: ClusterSnapshot, request: PodRequest, state: NodeState, pods: dict[str, PodInfo]
) -> bool:
    """Evict the cheapest extra pods of this node until the request's CPU and memory fit."""

    def short() -> tuple[int, int]:
        on_node = [p for p in pods.values() if p.node == state.name]
        cpu = request.cpu_milli - state.cpu_free() - sum(p.cpu_milli for p in on_node)
        memory = request.memory_mib - state.memory_free() - sum(p.memory_mib for p in on_node)
        return cpu, memory

    cpu, memory = short()
    if cpu <= 0 and memory <= 0:
        return True
    extras = sorted(
        (
            p
            for p in state.pods
            if p.uid not in pods
            and not p.gang
            and snapshot.evictable(p, request.uid, request.priority)
        ),
        key=lambda p: (p.priority, p.lost_work(snapshot.now), -p.start_time, p.uid),
    )
    for pod in extras:
        if (cpu > 0 and pod.cpu_milli) or (memory > 0 and pod.memory_mib):
            pods[pod.uid] = pod
            cpu, memory = short()
            if cpu <= 0 and memory <= 0:
                return True
    return False


def _summarise(snapshot: ClusterSnapshot, state: NodeState, pods: dict[str, PodInfo]) -> _Victims:
    per_pdb: dict[str, int] = {}
    for pod in pods.values():
        if pod.pdb:
            per_pdb[pod.pdb] = per_pdb.get(pod.pdb, 0) + 1
    violations = sum(max(0, count - _allowed(snapshot, name)) for name, count in per_pdb.items())
    node_mask = 0
    for pod in pods.values():
        if pod.node == state.name:
            node_mask |= pod.gpus
    return _Victims(
        pdb_violations=violations,
        max_priority=max((p.priority for p in pods.values()), default=NO_VICTIM_PRIORITY),
        lost_work=sum(p.lost_work(snapshot.now) for p in pods.values()),
        pods=len(pods),
        workloads=len({p.gang or p.workload or p.uid for p in pods.values()}),
        gpus_freed=sum(p.gpu_count for p in pods.values()),
        node_mask=node_mask,
        uids=tuple(sorted(pods)),
    )


def _allowed(snapshot: ClusterSnapshot, pdb: str) -> int:
    budget = snapshot.pdbs.get(pdb)
    return budget.disruptions_allowed if budget is not None else 2**31  # no such PDB: no limit


def plan_cost(
    snapshot: ClusterSnapshot, request: PodRequest, node: str, gpus: int, victims: Iterable[str]
) -> Cost:
    """The cost key of any plan (ours or a baseline's) on the same scale, for side-by-side
    reports. Victims are taken as given: a baseline that breaks a gang is not charged for the
    members it leaves behind here; the broken gang shows in the metrics instead."""
    state = snapshot.nodes[node]
    shape = state.info.shape
    pods = {uid: snapshot.pods[uid] for uid in victims}
    facts = _summarise(snapshot, state, pods)
    free = snapshot.free_gpus(node, request.uid)
    occupied = gpus & state.used
    return Cost(
        pdb_violations=facts.pdb_violations,
        max_victim_priority=facts.max_priority,
        topology_shortfall=0
        if request.mode is TopologyMode.NONE
        else shape.shortfall(gpus, request.tier),
        lost_work=facts.lost_work,
        victim_pods=facts.pods,
        victim_workloads=facts.workloads,
        waste_gpus=facts.gpus_freed - occupied.bit_count(),
        fragmentation=-shape.intact_value((free | facts.node_mask) & ~gpus),
        link_quality=-shape.quality[gpus],
        link_bottleneck=-shape.bottleneck[gpus],
    )

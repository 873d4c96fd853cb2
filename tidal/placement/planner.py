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
from typing import Any

from tidal.placement import status
from tidal.placement.cost import DEFAULT_ORDER, NO_VICTIM_PRIORITY, Cost, CostOrder, CostTuple
from tidal.placement.fit import best_placement
from tidal.placement.plan import NoPlan, Plan, PlanResult
from tidal.placement.request import PodRequest, TopologyMode
from tidal.placement.snapshot import ClusterSnapshot, NodeState, PodInfo
from tidal.placement.status import Code
from tidal.topology import NodeShape, Tier, bits

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


_Found = tuple[tuple[float, ...], str, int, "_Victims", CostTuple]
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _ShapeFacts:
    """Per (shape, request) tables, computed once per planning call."""

    holds: bytearray  # over GPU masks: the mask contains a set the request may take
    most_free: list[int]  # over free masks: most free GPUs inside one candidate set
    candidates: tuple[int, ...]

    @staticmethod
    def build(shape: NodeShape, request: PodRequest) -> _ShapeFacts | None:
        if request.gpus > shape.gpu_count:
            return None
        tier = request.tier if request.aligned_only else Tier.NODE
        holds = shape.has_aligned(request.gpus, tier)
        if not holds[shape.full_mask]:
            return None
        return _ShapeFacts(
            holds, shape.most_free_in_aligned(request.gpus, tier), _candidate_sets(shape, request)
        )


def _lower_bound(
    snapshot: ClusterSnapshot,
    state: NodeState,
    fact: _ShapeFacts,
    keep: int,
    avail: int,
    busy_needed: int,
) -> CostTuple:
    """A cost no plan on this node can undercut, component by component: any target set must
    free ``busy_needed`` busy GPUs, each held by a pod of at least the lowest evictable
    priority, losing at least the work of the ``busy_needed`` youngest busy GPUs."""
    shape = state.info.shape
    best_quality = -shape.quality[fact.candidates[0]]
    intact = -shape.intact_value(avail)
    if busy_needed <= 0:
        return (0, NO_VICTIM_PRIORITY, 0, 0.0, 0, 0, 0, intact, best_quality, -(2**62))
    youngest = state.latest_saved_per_gpu(keep)[:busy_needed]
    min_lost = sum(max(0.0, snapshot.now - saved) for saved in youngest)
    min_priority = state.min_priority_suffix[keep]
    return (0, min_priority, 0, min_lost, 1, 1, 0, intact, best_quality, -(2**62))


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
        facts: dict[NodeShape, _ShapeFacts | None] = {}
        screened = [
            s for n in names if (s := self._screen(snapshot, request, facts, n)) is not None
        ]
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
        best: _Found | None = None
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
        best: _Found | None,
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
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        facts: dict[NodeShape, _ShapeFacts | None],
        name: str,
    ) -> _Screened | None:
        state = snapshot.nodes.get(name)
        if state is None:
            return None
        shape = state.info.shape
        fact = facts.get(shape, _MISSING)
        if fact is _MISSING:
            fact = facts[shape] = _ShapeFacts.build(shape, request)
        if fact is None:
            return None
        if request.cpu_milli > state.info.cpu_milli or request.memory_mib > state.info.memory_mib:
            return None
        keep = state.protected_count(request.priority)
        blocked = snapshot.blocked_for(name, request.uid)
        avail = shape.full_mask & ~(state.protected_prefix[keep] | blocked)
        if not fact.holds[avail]:
            return None
        if request.cpu_milli > state.cpu_free() + state.cpu_used - state.cpu_prefix[keep]:
            return None
        if request.memory_mib > state.memory_free() + state.memory_used - state.memory_prefix[keep]:
            return None
        free = shape.full_mask & ~state.used & ~blocked
        busy_needed = request.gpus - fact.most_free[free]
        bound = self.order.key(_lower_bound(snapshot, state, fact, keep, avail, busy_needed))
        return _Screened(state, shape.full_mask & ~avail, bound)

    # -- exact evaluation of one node ------------------------------------------------------

    def _evaluate(
        self, snapshot: ClusterSnapshot, request: PodRequest, candidate: _Screened
    ) -> _Found | None:
        state = candidate.state
        shape = state.info.shape
        free = snapshot.free_gpus(state.name, request.uid)
        by_victims: dict[int, _Victims | None] = {}
        best: _Found | None = None
        aligned_by_construction = request.aligned_only or request.mode is TopologyMode.NONE
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
                0 if aligned_by_construction else shape.shortfall(target, request.tier),
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

"""Topology-first minimum-cost preemption (docs/architecture.md, the scheduling model).

With whole, exclusive GPUs, choosing the target GPU set S fixes the victims: every pod holding
a GPU in S. So minimising the cost key over the aligned target sets S of every node is exact, and
cheap (an 8-GPU node has at most C(8,4) = 70 sets of 4). Nodes are screened in O(1) with
precomputed prefix tables, then evaluated best lower bound first; a node whose lower bound
exceeds the best plan found is never evaluated.
"""

from __future__ import annotations

import bisect
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
    best_quality: int  # minus the best link quality of any candidate set

    @staticmethod
    def build(shape: NodeShape, request: PodRequest) -> _ShapeFacts | None:
        if request.gpus > shape.gpu_count:
            return None
        tier = request.tier if request.aligned_only else Tier.NODE
        holds = shape.has_aligned(request.gpus, tier)
        if not holds[shape.full_mask]:
            return None
        candidates = _candidate_sets(shape, request)
        most_free = shape.most_free_in_aligned(request.gpus, tier)
        return _ShapeFacts(holds, most_free, candidates, -shape.quality[candidates[0]])


def _lower_bound(
    now: float,
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
    intact = -shape.tier_intact_value(avail)
    if busy_needed <= 0:
        return (0, NO_VICTIM_PRIORITY, 0, 0.0, 0, 0, 0, intact, fact.best_quality, -(2**62))
    saved = state.saved_prefix(keep)  # sums of the latest checkpoints, youngest GPUs first
    min_lost = max(0.0, busy_needed * now - saved[min(busy_needed, len(saved) - 1)])
    priority = state.min_priority_suffix[keep]
    return (0, priority, 0, min_lost, 1, 1, 0, intact, fact.best_quality, -(2**62))


@dataclass(frozen=True, slots=True)
class _Screened:
    state: NodeState
    protected: int  # GPUs the preemptor may not take or free
    bound: tuple[float, ...]  # in the configured order
    values: CostTuple  # the same bound, canonical order
    keep: int  # pods[:keep] are protected by priority
    busy_needed: int


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
        screened = self._screen_all(snapshot, request, names)
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
            if best is not None and self._tighter_bound(snapshot, candidate) > best[0]:
                continue
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

    def _screen_all(
        self, snapshot: ClusterSnapshot, request: PodRequest, names: Iterable[str]
    ) -> list[_Screened]:
        """Every node that could be freed for the request, with a lower bound on its cost.
        Hot loop over the whole cluster: integer ops and table lookups, no method calls."""
        facts: dict[NodeShape, _ShapeFacts | None] = {}
        nodes, priority, uid = snapshot.nodes, request.priority, request.uid
        blocks = snapshot.has_blocks()
        out: list[_Screened] = []
        for name in names:
            state = nodes.get(name)
            if state is None:
                continue
            info = state.info
            shape = info.shape
            fact = facts.get(shape, _MISSING)
            if fact is _MISSING:
                fact = facts[shape] = _ShapeFacts.build(shape, request)
            if fact is None:
                continue
            keep = bisect.bisect_right(state.neg_priority, -priority)
            blocked = snapshot.blocked_for(name, uid) if blocks else 0
            avail = shape.full_mask & ~(state.protected_prefix[keep] | blocked)
            if not fact.holds[avail]:
                continue
            if request.cpu_milli > info.cpu_milli - state.cpu_prefix[keep]:
                continue
            if request.memory_mib > info.memory_mib - state.memory_prefix[keep]:
                continue
            busy_needed = request.gpus - fact.most_free[shape.full_mask & ~state.used & ~blocked]
            values = _lower_bound(snapshot.now, state, fact, keep, avail, busy_needed)
            bound = values if self.order.identity else self.order.key(values)
            out.append(_Screened(state, shape.full_mask & ~avail, bound, values, keep, busy_needed))
        return out

    def _tighter_bound(self, snapshot: ClusterSnapshot, candidate: _Screened) -> tuple[float, ...]:
        """The screening bound with its lost work made integral: evicting a pod loses the work
        of all its GPUs, so freeing k busy GPUs costs at least the cheapest whole-pod cover."""
        if candidate.busy_needed <= 0:
            return candidate.bound
        state = candidate.state
        evictable = [
            (p.gpu_count, p.lost_work(snapshot.now))
            for p in state.pods[candidate.keep :]
            if p.gpus and not p.gpus & candidate.protected
        ]
        lost = _cheapest_cover(evictable, candidate.busy_needed)
        values = candidate.values
        tighter: CostTuple = (*values[:3], max(values[3], lost), *values[4:])
        return self.order.key(tighter)

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
        summarise = _victim_summariser(snapshot, request, state)
        for target in _candidate_sets(shape, request):
            if target & candidate.protected:
                continue
            occupied = target & state.used
            victim_mask = _owners(state, occupied)
            victims = by_victims.get(victim_mask, _MISSING)
            if victims is _MISSING:
                victims = by_victims[victim_mask] = summarise(victim_mask)
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
                -shape.tier_intact_value((free | victims.node_mask) & ~target),
                -shape.quality[target],
                -shape.bottleneck[target],
            )
            found = (self.order.key(values), state.name, target, victims, values)
            if best is None or found[:3] < best[:3]:
                best = found
        return best


def _cheapest_cover(pods: list[tuple[int, float]], need: int) -> float:
    """Least total cost of whole pods (GPUs, cost) that together free at least ``need`` GPUs."""
    best = [0.0] + [float("inf")] * need
    for gpus, cost in pods:
        for freed in range(need, 0, -1):
            before = best[max(0, freed - gpus)] + cost
            best[freed] = min(best[freed], before)
    return best[need]


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


def _victim_summariser(
    snapshot: ClusterSnapshot, request: PodRequest, state: NodeState
) -> Callable[[int], _Victims | None]:
    """How to cost a victim set on this node. Most nodes hold no gang pods and have the CPU and
    memory the request needs: there, a victim set costs a few sums over per-pod arrays."""
    needs_extras = request.cpu_milli > state.cpu_free() or request.memory_mib > state.memory_free()
    if needs_extras or any(p.gang for p in state.pods):
        return lambda mask: _victims(snapshot, request, state, mask)
    pods = state.pods
    lost = [p.lost_work(snapshot.now) for p in pods]
    budgets = {p.pdb: _allowed(snapshot, p.pdb) for p in pods if p.pdb}

    def summarise(mask: int) -> _Victims | None:
        if not mask:
            return _NO_VICTIMS
        chosen = [pods[i] for i in bits(mask)]
        per_pdb: dict[str, int] = {}
        node_mask = 0
        for pod in chosen:
            node_mask |= pod.gpus
            if pod.pdb:
                per_pdb[pod.pdb] = per_pdb.get(pod.pdb, 0) + 1
        return _Victims(
            pdb_violations=sum(max(0, n - budgets[name]) for name, n in per_pdb.items()),
            max_priority=max(p.priority for p in chosen),
            lost_work=sum(lost[i] for i in bits(mask)),
            pods=len(chosen),
            workloads=len({p.workload or p.uid for p in chosen}),
            gpus_freed=node_mask.bit_count(),
            node_mask=node_mask,
            uids=tuple(sorted(p.uid for p in chosen)),
        )

    return summarise


_NO_VICTIMS = _Victims(0, NO_VICTIM_PRIORITY, 0.0, 0, 0, 0, 0, ())


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
        fragmentation=-shape.tier_intact_value((free | facts.node_mask) & ~gpus),
        link_quality=-shape.quality[gpus],
        link_bottleneck=-shape.bottleneck[gpus],
    )

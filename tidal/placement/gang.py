"""Gangs: pods that only work together, placed or preempted for as a unit inside one rack-level
NVLink domain (e.g. a tensor-parallel group over the trays of a GB200 NVL72 rack)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tidal.placement import status
from tidal.placement.cost import NO_VICTIM_PRIORITY, Cost
from tidal.placement.fit import Placement, filter_nodes
from tidal.placement.plan import NoPlan, Plan
from tidal.placement.planner import TopologyFirstPlanner
from tidal.placement.request import GangRequest, PodRequest
from tidal.placement.snapshot import ClusterSnapshot, PdbInfo, PodInfo
from tidal.placement.status import Code


@dataclass(frozen=True, slots=True)
class Assignment:
    member: str
    node: str
    gpus: int


@dataclass(frozen=True, slots=True)
class GangPlan:
    domain: str
    assignments: tuple[Assignment, ...]
    victims: tuple[str, ...]
    cost: Cost


def domains(snapshot: ClusterSnapshot) -> dict[str, list[str]]:
    """Nodes grouped by rack-level NVLink domain; nodes without one are not gang domains."""
    out: dict[str, list[str]] = {}
    for name, state in snapshot.nodes.items():
        if state.info.nvlink_domain:
            out.setdefault(state.info.nvlink_domain, []).append(name)
    return out


def plan_gang(
    snapshot: ClusterSnapshot,
    gang: GangRequest,
    planner: TopologyFirstPlanner | None = None,
    max_domains: int = 3,
) -> GangPlan | NoPlan:
    """Try the few domains whose free plus preemptible capacity best covers the gang; in each,
    place members largest first (free GPUs before preemption); keep the cheapest domain."""
    planner = planner or TopologyFirstPlanner()
    ranked = _rank_domains(snapshot, gang)
    if not ranked:
        reason = status.NO_CANDIDATE.format(
            detail="no NVLink domain has enough free or preemptible GPUs"
        )
        return NoPlan(planner.name, reason, Code.UNSCHEDULABLE)
    plans = [p for d in ranked[:max_domains] if (p := _plan_in_domain(snapshot, gang, d, planner))]
    if not plans:
        reason = status.NO_CANDIDATE.format(detail=f"tried domains {ranked[:max_domains]}")
        return NoPlan(planner.name, reason, Code.UNSCHEDULABLE, len(ranked))
    return min(plans, key=lambda p: (_cost_key(p.cost), p.domain))


def _rank_domains(snapshot: ClusterSnapshot, gang: GangRequest) -> list[str]:
    scored = []
    for domain, nodes in domains(snapshot).items():
        free, preemptible = 0, 0
        for name in nodes:
            state = snapshot.nodes[name]
            free += snapshot.free_gpus(name, None).bit_count()
            keep = state.protected_count(gang.priority)
            preemptible += sum(p.gpu_count for p in state.pods[keep:])
        if free + preemptible >= gang.gpus:
            scored.append((-min(free, gang.gpus), -(free + preemptible), domain))
    return [domain for *_, domain in sorted(scored)]


def _plan_in_domain(
    snapshot: ClusterSnapshot, gang: GangRequest, domain: str, planner: TopologyFirstPlanner
) -> GangPlan | None:
    work = snapshot.copy()
    nodes = domains(snapshot)[domain]
    assignments: list[Assignment] = []
    costs: list[Cost] = []
    victims: list[str] = []
    for member in sorted(gang.members, key=lambda m: (-m.gpus, m.uid)):
        placed = _free_placement(work, member, nodes)
        if placed is None:
            plan = planner.plan_preemption(work, member, nodes)
            if not isinstance(plan, Plan):
                return None
            _evict(work, plan.victims)
            victims.extend(plan.victims)
            costs.append(plan.cost)
            placed = Placement(plan.node, plan.gpus, plan.tier, plan.cost.topology_shortfall, 0, 0)
        work.add_pod(_as_pod(member, placed, gang.name, work.now))
        assignments.append(Assignment(member.uid, placed.node, placed.gpus))
    return GangPlan(domain, tuple(assignments), tuple(sorted(victims)), _combine(costs))


def _free_placement(
    work: ClusterSnapshot, member: PodRequest, nodes: Iterable[str]
) -> Placement | None:
    return filter_nodes(work, member, nodes).best()


def _evict(work: ClusterSnapshot, victims: Iterable[str]) -> None:
    for uid in victims:
        pod = work.remove_pod(uid)
        if pod.pdb and pod.pdb in work.pdbs:
            budget = work.pdbs[pod.pdb]
            work.pdbs[pod.pdb] = PdbInfo(budget.name, budget.disruptions_allowed - 1)


def _as_pod(member: PodRequest, placed: Placement, gang: str, now: float) -> PodInfo:
    return PodInfo(
        uid=member.uid,
        name=member.name,
        node=placed.node,
        gpus=placed.gpus,
        priority=member.priority,
        cpu_milli=member.cpu_milli,
        memory_mib=member.memory_mib,
        gang=gang,
        start_time=now,
    )


def _combine(costs: list[Cost]) -> Cost:
    """One gang-wide cost: sums of counts, the worst priority, shortfall and bottleneck."""
    return Cost(
        pdb_violations=sum(c.pdb_violations for c in costs),
        max_victim_priority=max((c.max_victim_priority for c in costs), default=NO_VICTIM_PRIORITY),
        topology_shortfall=max((c.topology_shortfall for c in costs), default=0),
        lost_work=sum(c.lost_work for c in costs),
        victim_pods=sum(c.victim_pods for c in costs),
        victim_workloads=sum(c.victim_workloads for c in costs),
        waste_gpus=sum(c.waste_gpus for c in costs),
        fragmentation=sum(c.fragmentation for c in costs),
        link_quality=sum(c.link_quality for c in costs),
        link_bottleneck=max((c.link_bottleneck for c in costs), default=0),
    )


def _cost_key(cost: Cost) -> tuple[float, ...]:
    return tuple(cost.as_dict().values())

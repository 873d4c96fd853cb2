"""Every placement policy behind one interface, so callers run them side by side.

- ``tidal``: fragmentation-aware fit and the topology-first planner (ours).
- ``b0-default``: Kubernetes default preemption: count-based victims with reprieve in priority
  order, GPU ids chosen first-free at bind.
- ``b1-anchor``: Koordinator DeviceShare-like: the same reprieve loop with a topology-aware
  feasibility check, then the best aligned set of what was freed.
- ``b2-subsets``: the seed paper's method: enumerate victim subsets per node (capped), keep the
  feasible ones, rank by alignment of what they free.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tidal.placement import status
from tidal.placement.demand import Demand
from tidal.placement.fit import (
    Placement,
    best_placement,
    choose_gpus,
    first_free_gpus,
    placement_of,
)
from tidal.placement.plan import NoPlan, Plan, PlanResult
from tidal.placement.planner import TopologyFirstPlanner, plan_cost
from tidal.placement.request import PodRequest, TopologyMode
from tidal.placement.snapshot import ClusterSnapshot, NodeState, PodInfo
from tidal.placement.status import Code
from tidal.topology import NodeShape

# Feasibility of a node state for the request: (free GPU mask, free CPU, free memory) -> fits.
Fits = Callable[[int, int, int], bool]


class Policy(Protocol):
    name: str

    def place(self, snapshot: ClusterSnapshot, request: PodRequest) -> Placement | None:
        """A placement on free resources, or None."""
        ...

    def preempt(self, snapshot: ClusterSnapshot, request: PodRequest) -> PlanResult:
        """A preemption plan for a request that does not fit free resources."""
        ...


class TidalPolicy:
    """Ours: placement ranked by demand-weighted fragmentation, then bin packing
    (:mod:`tidal.placement.fit`), with the demand learned from the pods it is asked to place
    (``demand=None``: a fresh :class:`Demand`); preemption by the topology-first planner."""

    name = "tidal"

    def __init__(
        self, planner: TopologyFirstPlanner | None = None, demand: Demand | None = None
    ) -> None:
        self.planner = planner or TopologyFirstPlanner()
        self.demand = Demand() if demand is None else demand

    def place(self, snapshot: ClusterSnapshot, request: PodRequest) -> Placement | None:
        self.demand.observe(request)
        return best_placement(snapshot, request, self.demand.mix())

    def preempt(self, snapshot: ClusterSnapshot, request: PodRequest) -> PlanResult:
        return self.planner.plan_preemption(snapshot, request)


@dataclass(frozen=True, slots=True)
class _NodeVictims:
    node: str
    victims: tuple[PodInfo, ...]
    pdb_violations: int

    def k8s_rank(self) -> tuple[int, int, int, int, float, str]:
        """kube-scheduler's pickOneNodeForPreemption order: fewest PDB violations, lowest
        highest-victim priority, lowest priority sum, fewest victims, latest start of the
        highest-priority victims, then the first node."""
        top = max(p.priority for p in self.victims)
        earliest_top = min(p.start_time for p in self.victims if p.priority == top)
        return (
            self.pdb_violations,
            top,
            sum(p.priority for p in self.victims),
            len(self.victims),
            -earliest_top,
            self.node,
        )


class _ReprievePolicy:
    """The kube-scheduler preemption skeleton; subclasses say what "fits" means and which GPUs
    the pod gets. ``scoring`` is NodeResourcesFit's strategy: ``most-allocated`` (bin packing,
    what GPU clusters configure for extended resources) or ``least-allocated`` (the spreading
    default of a stock kube-scheduler)."""

    name = "reprieve"

    def __init__(self, scoring: str = "most-allocated") -> None:
        if scoring not in SCORING_STRATEGIES:
            raise ValueError(f"scoring {scoring!r}: expected one of {SCORING_STRATEGIES}")
        self.spread = scoring == "least-allocated"

    def gpus_fit(self, shape: NodeShape, free: int, request: PodRequest) -> bool:
        """Whether GPU set ``free`` holds the request, as this policy understands it."""
        raise NotImplementedError

    def pick_gpus(self, shape: NodeShape, free: int, request: PodRequest) -> int | None:
        raise NotImplementedError

    def fits(self, shape: NodeShape, request: PodRequest) -> Fits:
        def node_fits(free: int, cpu: int, memory: int) -> bool:
            return (
                cpu >= request.cpu_milli
                and memory >= request.memory_mib
                and self.gpus_fit(shape, free, request)
            )

        return node_fits

    def place(self, snapshot: ClusterSnapshot, request: PodRequest) -> Placement | None:
        """NodeResourcesFit scoring with GPUs weighted first (the bin-packing setup GPU clusters
        use for ``nvidia.com/gpu``): the node whose GPUs are most (or least) allocated once the
        pod is on it, then CPU and memory the same way, then the name. Nodes are visited by free
        class, best GPU fraction first, so a busy cluster costs a few classes, not every node."""
        blocked = snapshot.blocked_nodes()
        groups: dict[float, list[tuple[list[str], bool]]] = {}
        for (shape, free), names in snapshot.free_classes().items():
            if self.gpus_fit(shape, free, request):
                groups.setdefault(self._gpu_rank(shape, free, request), []).append((names, True))
        for name in blocked:
            shape = snapshot.nodes[name].info.shape
            free = snapshot.free_gpus(name, request.uid)
            if self.gpus_fit(shape, free, request):
                groups.setdefault(self._gpu_rank(shape, free, request), []).append(([name], False))
        for rank in sorted(groups):
            best = self._best_with_room(snapshot, request, groups[rank], blocked)
            if best is not None:
                return self._place_on(snapshot, best, request)
        return None

    def _gpu_rank(self, shape: NodeShape, free: int, request: PodRequest) -> float:
        allocated = (shape.gpu_count - free.bit_count() + request.gpus) / shape.gpu_count
        return allocated if self.spread else -allocated

    def _best_with_room(
        self,
        snapshot: ClusterSnapshot,
        request: PodRequest,
        groups: list[tuple[list[str], bool]],
        blocked: Mapping[str, object],
    ) -> NodeState | None:
        sign = 1 if self.spread else -1
        best: tuple[tuple[float, str], NodeState] | None = None
        for names, from_class in groups:
            for name in names:
                if from_class and name in blocked:
                    continue  # ranked on its own, with the GPUs this pod may use
                state = snapshot.nodes[name]
                if request.cpu_milli > state.cpu_free() or request.memory_mib > state.memory_free():
                    continue
                rank = (sign * _host_fraction(state, request), name)
                if best is None or rank < best[0]:
                    best = (rank, state)
        return None if best is None else best[1]

    def _place_on(
        self, snapshot: ClusterSnapshot, state: NodeState, request: PodRequest
    ) -> Placement | None:
        shape = state.info.shape
        free = snapshot.free_gpus(state.name, request.uid)
        if not self.fits(shape, request)(free, state.cpu_free(), state.memory_free()):
            return None
        gpus = self.pick_gpus(shape, free, request)
        return None if gpus is None else placement_of(state.name, shape, free, gpus, request)

    def preempt(self, snapshot: ClusterSnapshot, request: PodRequest) -> PlanResult:
        candidates = [
            c for s in snapshot.nodes.values() if (c := self._select_victims(snapshot, request, s))
        ]
        if not candidates:
            return NoPlan(self.name, status.NO_CANDIDATE.format(detail=status.PROTECTED))
        chosen = min(candidates, key=_NodeVictims.k8s_rank)
        return self._plan(snapshot, request, chosen, len(candidates))

    def _plan(
        self, snapshot: ClusterSnapshot, request: PodRequest, chosen: _NodeVictims, evaluated: int
    ) -> PlanResult:
        state = snapshot.nodes[chosen.node]
        shape = state.info.shape
        freed = snapshot.free_gpus(chosen.node, request.uid)
        for pod in chosen.victims:
            freed |= pod.gpus
        gpus = self.pick_gpus(shape, freed, request)
        if gpus is None:
            return NoPlan(
                self.name, "freed GPUs do not hold the pod", Code.UNSCHEDULABLE, evaluated
            )
        victims = tuple(sorted(p.uid for p in chosen.victims))
        return Plan(
            policy=self.name,
            node=chosen.node,
            gpus=gpus,
            tier=shape.tier_of(gpus),
            victims=victims,
            cost=plan_cost(snapshot, request, chosen.node, gpus, victims),
            nodes_evaluated=evaluated,
        )

    def may_free_enough(
        self, snapshot: ClusterSnapshot, request: PodRequest, state: NodeState
    ) -> bool:
        """A cheap necessary condition: evicting every pod the preemptor may evict frees GPUs
        that hold it. Most nodes of a busy cluster fail it, so the costly search skips them."""
        shape = state.info.shape
        protected = state.protected_prefix[state.protected_count(request.priority)]
        reachable = shape.full_mask & ~protected & ~snapshot.blocked_for(state.name, request.uid)
        return self.gpus_fit(shape, reachable, request) and _allocatable_holds(state, request)

    def _select_victims(
        self, snapshot: ClusterSnapshot, request: PodRequest, state: NodeState
    ) -> _NodeVictims | None:
        """kube-scheduler's selectVictimsOnNode: remove every lower-priority pod; if the pod
        then fits, add pods back (PDB-violating ones first, each group by priority, highest
        first) while it still fits. The pods that could not come back are the victims."""
        if not self.may_free_enough(snapshot, request, state):
            return None
        fits = self.fits(state.info.shape, request)
        potential = [p for p in state.pods if snapshot.evictable(p, request.uid, request.priority)]
        free = snapshot.free_gpus(state.name, request.uid)
        cpu, memory = state.cpu_free(), state.memory_free()
        for pod in potential:
            free, cpu, memory = free | pod.gpus, cpu + pod.cpu_milli, memory + pod.memory_mib
        if not potential or not fits(free, cpu, memory):
            return None
        violating, respecting = _split_by_pdb(snapshot, _by_importance(potential))
        victims: list[PodInfo] = []
        violations = 0
        for pod in violating + respecting:
            trial = (free & ~pod.gpus, cpu - pod.cpu_milli, memory - pod.memory_mib)
            if fits(*trial):
                free, cpu, memory = trial
            else:
                victims.append(pod)
                violations += pod in violating
        if not victims:
            return None  # fits without victims: not a preemption (kubernetes issue #139270)
        return _NodeVictims(state.name, tuple(victims), violations)


class KubernetesDefault(_ReprievePolicy):
    """B0: count-based feasibility, first-free GPU ids."""

    name = "b0-default"

    def gpus_fit(self, shape: NodeShape, free: int, request: PodRequest) -> bool:
        return free.bit_count() >= request.gpus

    def pick_gpus(self, shape: NodeShape, free: int, request: PodRequest) -> int | None:
        return first_free_gpus(free, request.gpus)


class AnchorLike(_ReprievePolicy):
    """B1: topology-aware feasibility inside the reprieve loop, priority-ordered victims."""

    name = "b1-anchor"

    def gpus_fit(self, shape: NodeShape, free: int, request: PodRequest) -> bool:
        if request.mode is TopologyMode.GUARANTEED:
            return bool(shape.has_aligned(request.gpus, request.tier)[free])
        return free.bit_count() >= request.gpus

    def pick_gpus(self, shape: NodeShape, free: int, request: PodRequest) -> int | None:
        return choose_gpus(shape, free, request.gpus, request.mode, request.tier)


class SubsetEnumeration(AnchorLike):
    """B2: the seed paper's exhaustive victim subsets per node, ranked by the alignment of the
    freed GPUs. Exponential, so subsets are capped at ``max_victims`` pods drawn from the
    ``max_candidates`` lowest-priority pods of a node; plans say when a cap cut the search."""

    name = "b2-subsets"

    def __init__(
        self, max_victims: int = 4, max_candidates: int = 16, scoring: str = "most-allocated"
    ) -> None:
        super().__init__(scoring)
        self.max_victims = max_victims
        self.max_candidates = max_candidates

    def preempt(self, snapshot: ClusterSnapshot, request: PodRequest) -> PlanResult:
        best: tuple[tuple[float, ...], _NodeVictims] | None = None
        capped = 0
        for state in snapshot.nodes.values():
            if not self.may_free_enough(snapshot, request, state):
                continue
            found, was_capped = self._best_subset(snapshot, request, state)
            capped += was_capped
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        if best is None:
            return NoPlan(self.name, status.NO_CANDIDATE.format(detail=status.PROTECTED))
        result = self._plan(snapshot, request, best[1], len(snapshot.nodes))
        if capped and isinstance(result, Plan):
            cap = f"<= {self.max_victims} of {self.max_candidates} pods"
            return dataclasses.replace(result, notes=(f"subset cap ({cap}) cut {capped} nodes",))
        return result

    def _best_subset(
        self, snapshot: ClusterSnapshot, request: PodRequest, state: NodeState
    ) -> tuple[tuple[tuple[float, ...], _NodeVictims] | None, bool]:
        shape = state.info.shape
        fits = self.fits(shape, request)
        potential = sorted(
            (p for p in state.pods if snapshot.evictable(p, request.uid, request.priority)),
            key=lambda p: (p.priority, -p.start_time, p.uid),
        )
        capped = len(potential) > self.max_candidates or len(potential) > self.max_victims
        potential = potential[: self.max_candidates]
        base = snapshot.free_gpus(state.name, request.uid)
        best: tuple[tuple[float, ...], _NodeVictims] | None = None
        for size in range(1, min(self.max_victims, len(potential)) + 1):
            for subset in itertools.combinations(potential, size):
                rank = self._rank(shape, request, state, base, subset, fits)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, _NodeVictims(state.name, subset, 0))
        return best, capped

    def _rank(
        self,
        shape: NodeShape,
        request: PodRequest,
        state: NodeState,
        base: int,
        subset: Sequence[PodInfo],
        fits: Fits,
    ) -> tuple[float, ...] | None:
        free = base
        for pod in subset:
            free |= pod.gpus
        cpu = state.cpu_free() + sum(p.cpu_milli for p in subset)
        memory = state.memory_free() + sum(p.memory_mib for p in subset)
        if not fits(free, cpu, memory):
            return None
        gpus = choose_gpus(shape, free, request.gpus, TopologyMode.BEST_EFFORT, request.tier)
        if gpus is None:
            return None
        alignment = shape.shortfall(gpus, request.tier)
        return (alignment, -shape.quality[gpus], len(subset), sum(p.priority for p in subset))


def _allocatable_holds(state: NodeState, request: PodRequest) -> bool:
    info = state.info
    return request.cpu_milli <= info.cpu_milli and request.memory_mib <= info.memory_mib


def _by_importance(pods: Iterable[PodInfo]) -> list[PodInfo]:
    """kube-scheduler's MoreImportantPod: higher priority first, then the earlier start."""
    return sorted(pods, key=lambda p: (-p.priority, p.start_time, p.uid))


def _split_by_pdb(
    snapshot: ClusterSnapshot, pods: list[PodInfo]
) -> tuple[list[PodInfo], list[PodInfo]]:
    """Pods whose eviction would break their PDB (budget counted down in order) and the rest."""
    budget = {name: pdb.disruptions_allowed for name, pdb in snapshot.pdbs.items()}
    violating: list[PodInfo] = []
    respecting: list[PodInfo] = []
    for pod in pods:
        if pod.pdb in budget:
            budget[pod.pdb] -= 1
            if budget[pod.pdb] < 0:
                violating.append(pod)
                continue
        respecting.append(pod)
    return violating, respecting


def _host_fraction(state: NodeState, request: PodRequest) -> float:
    """Mean requested fraction of CPU and memory once ``request`` is on the node."""
    info = state.info
    cpu = (state.cpu_used + request.cpu_milli) / info.cpu_milli if info.cpu_milli else 0.0
    memory = (state.memory_used + request.memory_mib) / info.memory_mib if info.memory_mib else 0.0
    return (cpu + memory) / 2


POLICY_NAMES = ("tidal", "b0-default", "b1-anchor", "b2-subsets")
SCORING_STRATEGIES = ("most-allocated", "least-allocated")


def make_policy(
    name: str, scoring: str = "most-allocated", deadline_s: float | None = None
) -> Policy:
    """A policy by name; ``scoring`` is the baselines' node scoring (ours has its own);
    ``deadline_s`` bounds our planner's search (None: its default; a replay that must be
    reproducible passes infinity, since a time bound makes plans depend on machine load)."""
    planner = (
        TopologyFirstPlanner()
        if deadline_s is None
        else TopologyFirstPlanner(deadline_s=deadline_s)
    )
    factories: dict[str, Callable[[], Policy]] = {
        "tidal": lambda: TidalPolicy(planner),
        "b0-default": lambda: KubernetesDefault(scoring),
        "b1-anchor": lambda: AnchorLike(scoring),
        "b2-subsets": lambda: SubsetEnumeration(scoring=scoring),
    }
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factories[name]()

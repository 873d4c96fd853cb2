"""The preemption cost key, compared lexicographically (smaller wins); docs/architecture.md
explains each component.

Components are kept in one canonical tuple; a :class:`CostOrder` permutes it into the order an
operator configured. Link quality and fragmentation are stored negated so that smaller is better
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

COMPONENTS: tuple[str, ...] = (
    "pdb_violations",  # PodDisruptionBudget violations, as Kubernetes counts them
    "max_victim_priority",  # highest priority among the victims
    "topology_shortfall",  # tiers between the requested tier and the achieved one
    "lost_work",  # GPU-seconds since the victims' last checkpoints
    "victim_pods",
    "victim_workloads",  # distinct workloads (a gang counts whole)
    "waste_gpus",  # GPUs freed that the preemptor does not use
    "fragmentation",  # minus the intact aligned capacity left on the node
    "link_quality",  # minus the sum of pair weights of the chosen set
    "link_bottleneck",  # minus its weakest pair
)
NO_VICTIM_PRIORITY = -(2**62)

CostTuple = tuple[int, int, int, float, int, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class Cost:
    pdb_violations: int
    max_victim_priority: int
    topology_shortfall: int
    lost_work: float
    victim_pods: int
    victim_workloads: int
    waste_gpus: int
    fragmentation: int
    link_quality: int
    link_bottleneck: int

    @staticmethod
    def of(values: CostTuple) -> Cost:
        return Cost(*values)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENTS}


class CostOrder:
    """A configurable lexicographic order over :data:`COMPONENTS`.

    Components left out of ``names`` follow in their canonical order, so every order is total.
    """

    def __init__(self, names: Sequence[str] = COMPONENTS) -> None:
        unknown = [n for n in names if n not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown cost components {unknown}; known: {', '.join(COMPONENTS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"cost order repeats a component: {list(names)}")
        ordered = [*names, *(n for n in COMPONENTS if n not in names)]
        self.names = tuple(ordered)
        self._indices = tuple(COMPONENTS.index(n) for n in ordered)
        self.identity = self._indices == tuple(range(len(COMPONENTS)))

    def key(self, values: CostTuple) -> tuple[float, ...]:
        if self.identity:
            return values
        return tuple(values[i] for i in self._indices)


DEFAULT_ORDER = CostOrder()

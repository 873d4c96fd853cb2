"""Preemption plans as values: a :class:`Plan` or a :class:`NoPlan` with its reason."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.placement.cost import Cost
from tidal.placement.status import Code
from tidal.topology import Tier, bits


@dataclass(frozen=True, slots=True)
class Plan:
    """Evict ``victims`` (pod UIDs) so the preemptor can take GPU set ``gpus`` on ``node``."""

    policy: str
    node: str
    gpus: int
    tier: Tier
    victims: tuple[str, ...]
    cost: Cost
    nodes_evaluated: int = 0
    deadline_hit: bool = False
    notes: tuple[str, ...] = ()

    code = Code.SUCCESS

    @property
    def gpu_list(self) -> list[int]:
        return bits(self.gpus)


@dataclass(frozen=True, slots=True)
class NoPlan:
    """Why no preemption can place the pod. ``UNRESOLVABLE`` when no eviction could ever help."""

    policy: str
    reason: str
    code: Code = Code.UNSCHEDULABLE
    nodes_evaluated: int = 0
    deadline_hit: bool = False


PlanResult = Plan | NoPlan

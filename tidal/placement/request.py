"""What a pod asks for: GPUs, CPU, memory, priority and a topology requirement."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tidal.topology import Tier


class TopologyMode(enum.StrEnum):
    GUARANTEED = "guaranteed"  # only aligned placements
    BEST_EFFORT = "best-effort"  # prefer aligned; accept the best available
    NONE = "none"  # topology does not matter


@dataclass(frozen=True, slots=True)
class PodRequest:
    """A pod that needs ``gpus`` whole GPUs on one node."""

    uid: str
    name: str
    gpus: int
    priority: int
    cpu_milli: int = 0
    memory_mib: int = 0
    mode: TopologyMode = TopologyMode.BEST_EFFORT
    tier: Tier = Tier.NVLINK
    gang: str | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"request {self.name}: gpus must be >= 1, got {self.gpus}")
        if self.tier is Tier.RACK:
            raise ValueError(f"request {self.name}: tier 'rack' applies to gangs, not one pod")

    @property
    def aligned_only(self) -> bool:
        return self.mode is TopologyMode.GUARANTEED


@dataclass(frozen=True, slots=True)
class GangRequest:
    """Pods that only work together (e.g. one tensor-parallel group across the trays of an
    NVLink rack): placed, or preempted for, as a unit inside one rack NVLink domain."""

    name: str
    members: tuple[PodRequest, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"gang {self.name}: no members")
        if len({m.priority for m in self.members}) != 1:
            raise ValueError(f"gang {self.name}: members must share one priority")

    @property
    def priority(self) -> int:
        return self.members[0].priority

    @property
    def gpus(self) -> int:
        return sum(m.gpus for m in self.members)


def default_topology(tensor_parallel: int, has_nvswitch: bool) -> tuple[TopologyMode, Tier]:
    """The default requirement for a tensor-parallel group: all-reduce libraries want full
    NVLink connectivity for TP > 2 where no NVSwitch joins every GPU; otherwise prefer it."""
    if tensor_parallel > 2 and not has_nvswitch:
        return TopologyMode.GUARANTEED, Tier.NVLINK
    if tensor_parallel == 1:
        return TopologyMode.NONE, Tier.NODE
    return TopologyMode.BEST_EFFORT, Tier.NVLINK

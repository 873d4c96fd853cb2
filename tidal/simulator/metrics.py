"""Metrics of SCHEDULING.md §6, accumulated per policy during a replay."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidal.placement import ClusterSnapshot, Plan, PodRequest, TopologyMode
from tidal.simulator.scenario import Scenario
from tidal.topology import NodeShape

if TYPE_CHECKING:
    from tidal.simulator.workload import BatchJob


@dataclass
class Metrics:
    policy: str
    total_gpus: int
    scenario: Scenario
    # M1 affinity hits of preemptor placements, by mode
    hits: dict[str, list[int]] = field(
        default_factory=lambda: {"guaranteed": [0, 0], "best-effort": [0, 0]}
    )
    preemptions: int = 0
    victim_pods: int = 0
    victim_gpus: int = 0
    wasted_gpus: int = 0  # M3
    lost_gpu_seconds: float = 0.0  # M5
    cascades: int = 0  # M8
    jobs_completed: int = 0
    goodput_gpu_seconds: float = 0.0
    priority_inversions: int = 0  # M10
    double_allocations: int = 0
    leaked_reservations: int = 0
    latency_s: dict[str, list[float]] = field(default_factory=lambda: {"place": [], "preempt": []})
    series: list[dict[str, float]] = field(default_factory=list)  # per step

    def preemption(
        self, request: PodRequest, plan: Plan, shape: NodeShape, lost: float, victim_gpus: int
    ) -> None:
        self.preemptions += 1
        self.victim_pods += len(plan.victims)
        self.victim_gpus += victim_gpus
        self.wasted_gpus += plan.cost.waste_gpus
        self.lost_gpu_seconds += lost
        mode = request.mode.value
        if request.mode is not TopologyMode.NONE:
            self.hits[mode][1] += 1
            self.hits[mode][0] += shape.is_aligned(plan.gpus, request.tier)

    def decision(self, verb: str, seconds: float) -> None:
        self.latency_s[verb].append(seconds)

    def job_completed(self, job: BatchJob) -> None:
        self.jobs_completed += 1
        self.goodput_gpu_seconds += job.work_s * job.gpus

    def sample(self, now: float, snapshot: ClusterSnapshot, served: tuple[float, float]) -> None:
        used = sum(s.used.bit_count() for s in snapshot.nodes.values())
        demanded, delivered = served
        self.series.append(
            {
                "t_h": now / 3600,
                "allocation": used / self.total_gpus,
                "online_demand": demanded,
                "online_served": delivered,
                "preemptions": self.preemptions,
                "wasted_gpus": self.wasted_gpus,
                "lost_gpu_hours": self.lost_gpu_seconds / 3600,
            }
        )

    def finish(self, snapshot: ClusterSnapshot, binding: set[str]) -> None:
        """Reservations still held at the end by preemptors that are not waiting to bind."""
        self.leaked_reservations = sum(1 for uid in snapshot.reservations if uid not in binding)

    def summary(self) -> dict[str, Any]:
        demand = sum(s["online_demand"] for s in self.series)
        served = sum(s["online_served"] for s in self.series)
        unmet_steps = sum(1 for s in self.series if s["online_served"] + 1e-9 < s["online_demand"])
        return {
            "policy": self.policy,
            "M1_affinity_hit_guaranteed": _rate(self.hits["guaranteed"]),
            "M1_affinity_hit_best_effort": _rate(self.hits["best-effort"]),
            "M3_wasted_gpus": self.wasted_gpus,
            "M4_victims_per_preemption": self.victim_pods / self.preemptions
            if self.preemptions
            else 0.0,
            "M5_lost_gpu_hours": self.lost_gpu_seconds / 3600,
            "M7_online_served_fraction": served / demand if demand else 1.0,
            "M7_hours_with_unmet_demand": unmet_steps * self.scenario.step_s / 3600,
            "M8_jobs_completed": self.jobs_completed,
            "M8_goodput_gpu_hours": self.goodput_gpu_seconds / 3600,
            "M8_cascades": self.cascades,
            "M9_mean_allocation": statistics.fmean(s["allocation"] for s in self.series)
            if self.series
            else 0.0,
            "M10_priority_inversions": self.priority_inversions,
            "M10_double_allocations": self.double_allocations,
            "M10_leaked_reservations": self.leaked_reservations,
            "M11_place_p99_ms": _p99_ms(self.latency_s["place"]),
            "M11_preempt_p99_ms": _p99_ms(self.latency_s["preempt"]),
            "preemptions": self.preemptions,
        }


def _rate(pair: list[int]) -> float | None:
    hits, total = pair
    return hits / total if total else None


def _p99_ms(samples: list[float]) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000

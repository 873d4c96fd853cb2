"""The simulator's metrics M1-M12 (listed in docs/architecture.md), accumulated per policy
during a replay.

The summary keys are prefixed with the metric they belong to (``M1_...``), so the terminal
table, the JSON file and the report read the same names. M12 (optimality against brute force)
is measured on small instances by :mod:`tidal.simulator.optimality`, not during a replay.
"""

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
class Preemption:
    """What one preemption did, as the metrics need it."""

    request: PodRequest
    plan: Plan
    shape: NodeShape
    victim_gpus: int
    victim_workloads: int
    lost_gpu_seconds: float


@dataclass
class Metrics:
    policy: str
    total_gpus: int
    scenario: Scenario
    # M1 affinity hits of preemptor placements, by mode: [hits, preemptions]
    hits: dict[str, list[int]] = field(
        default_factory=lambda: {"guaranteed": [0, 0], "best-effort": [0, 0]}
    )
    preemptions: int = 0
    preemptors_bound: int = 0  # M2: bound within the success window
    preemptors_late_or_failed: int = 0
    victim_pods: int = 0  # M4
    victim_gpus: int = 0
    victim_workloads: int = 0
    broken_gangs: int = 0  # M4: gangs a plan took only part of (the rest evicted with them)
    wasted_gpus: int = 0  # M3
    lost_gpu_seconds: float = 0.0  # M5
    preemptor_wait_s: list[float] = field(default_factory=list)  # M6
    online_wait_s: list[float] = field(default_factory=list)
    online_bound: dict[str, list[int]] = field(default_factory=dict)  # mode -> [aligned, bound]
    cascades: int = 0  # M8
    jobs_completed: int = 0
    completion_s: list[float] = field(default_factory=list)
    goodput_gpu_seconds: float = 0.0  # M8: work of the jobs finished by the horizon
    batch_gpu_seconds: float = 0.0  # M8: GPU-seconds batch pods held (finished, evicted, running)
    priority_inversions: int = 0  # M10
    double_allocations: int = 0
    leaked_reservations: int = 0
    latency_s: dict[str, list[float]] = field(default_factory=lambda: {"place": [], "preempt": []})
    series: list[dict[str, Any]] = field(default_factory=list)  # per step

    def preemption(self, done: Preemption) -> None:
        self.preemptions += 1
        self.victim_pods += len(done.plan.victims)
        self.victim_gpus += done.victim_gpus
        self.victim_workloads += done.victim_workloads
        self.wasted_gpus += done.plan.cost.waste_gpus
        self.lost_gpu_seconds += done.lost_gpu_seconds
        request = done.request
        if request.mode is not TopologyMode.NONE:
            tally = self.hits[request.mode.value]
            tally[1] += 1
            tally[0] += done.shape.is_aligned(done.plan.gpus, request.tier)

    def preemptor_outcome(self, waited_s: float | None) -> None:
        """A preemptor bound ``waited_s`` after its preemption, or never (None)."""
        if waited_s is not None and waited_s <= self.scenario.preemption_window_s:
            self.preemptors_bound += 1
        else:
            self.preemptors_late_or_failed += 1

    def online_bound_at(
        self, mode: TopologyMode, aligned: bool, waited_s: float, preempted: bool
    ) -> None:
        tally = self.online_bound.setdefault(mode.value, [0, 0])
        tally[0] += aligned
        tally[1] += 1
        (self.preemptor_wait_s if preempted else self.online_wait_s).append(waited_s)

    def decision(self, verb: str, seconds: float) -> None:
        self.latency_s[verb].append(seconds)

    def job_completed(self, job: BatchJob, now: float) -> None:
        self.jobs_completed += 1
        self.completion_s.append(now - job.arrival)
        self.goodput_gpu_seconds += job.work_s * job.total_gpus

    def batch_ran(self, gpu_seconds: float) -> None:
        """A batch job's workers held their GPUs for ``gpu_seconds`` (it finished, was
        evicted, or is still running at the horizon)."""
        self.batch_gpu_seconds += gpu_seconds

    def sample(
        self,
        now: float,
        snapshot: ClusterSnapshot,
        placed: tuple[int, dict[str, int]],
        pending: tuple[int, int],
    ) -> None:
        used = sum(s.used.bit_count() for s in snapshot.nodes.values())
        demanded, by_tier = placed
        self.series.append(
            {
                "t_h": now / 3600,
                "allocation": used / self.total_gpus,
                "intact": _intact_fraction(snapshot),
                "online_demand": demanded,
                "online_bound": sum(by_tier.values()),
                "online_served": served_load(by_tier, self.scenario.tier_throughput),
                "placed_by_tier": by_tier,
                "online_pending": pending[0],
                "batch_pending": pending[1],
                "preemptions": self.preemptions,
                "wasted_gpus": self.wasted_gpus,
                "lost_gpu_hours": self.lost_gpu_seconds / 3600,
            }
        )

    def finish(self, snapshot: ClusterSnapshot, binding: set[str]) -> None:
        """Reservations still held at the end by preemptors that are not waiting to bind."""
        self.leaked_reservations = sum(1 for uid in snapshot.reservations if uid not in binding)

    def summary(self) -> dict[str, Any]:
        step_h = self.scenario.step_s / 3600
        series = self.series
        demand = sum(s["online_demand"] for s in series)
        served = sum(s["online_served"] for s in series)
        n = self.preemptions or 1
        return {
            "policy": self.policy,
            "M1_affinity_hit_guaranteed": _rate(self.hits["guaranteed"]),
            "M1_affinity_hit_best_effort": _rate(self.hits["best-effort"]),
            "M1_online_aligned_guaranteed": _rate(self.online_bound.get("guaranteed")),
            "M1_online_aligned_best_effort": _rate(self.online_bound.get("best-effort")),
            "M2_preemption_success": _rate(
                [self.preemptors_bound, self.preemptors_bound + self.preemptors_late_or_failed]
            ),
            "M3_wasted_gpus": self.wasted_gpus,
            "M3_wasted_per_preemption": self.wasted_gpus / n,
            "M4_victim_pods_per_preemption": self.victim_pods / n,
            "M4_victim_gpus_per_preemption": self.victim_gpus / n,
            "M4_victim_workloads_per_preemption": self.victim_workloads / n,
            "M4_broken_gangs": self.broken_gangs,
            "M5_lost_gpu_hours": self.lost_gpu_seconds / 3600,
            "M6_preemptor_bind_p50_s": _quantile(self.preemptor_wait_s, 0.5),
            "M6_preemptor_bind_p99_s": _quantile(self.preemptor_wait_s, 0.99),
            "M6_online_bind_p99_s": _quantile(self.online_wait_s, 0.99),
            "M7_online_served_fraction": served / demand if demand else 1.0,
            "M7_online_bound_fraction": (
                sum(s.get("online_bound", 0) for s in series) / demand if demand else 1.0
            ),
            "M7_hours_with_pending_replicas": step_h * sum(s["online_pending"] > 0 for s in series),
            "M8_jobs_completed": self.jobs_completed,
            "M8_completion_p50_h": _quantile(self.completion_s, 0.5) / 3600,
            "M8_goodput_gpu_hours": self.goodput_gpu_seconds / 3600,
            "M8_batch_gpu_hours": self.batch_gpu_seconds / 3600,
            "M8_work_done_gpu_hours": (self.batch_gpu_seconds - self.lost_gpu_seconds) / 3600,
            "M8_cascades": self.cascades,
            "M9_mean_allocation": _mean(s["allocation"] for s in series),
            "M9_mean_intact_capacity": _mean(s["intact"] for s in series),
            "M10_priority_inversions": self.priority_inversions,
            "M10_double_allocations": self.double_allocations,
            "M10_leaked_reservations": self.leaked_reservations,
            "M11_place_p50_ms": _quantile(self.latency_s["place"], 0.5) * 1000,
            "M11_place_p99_ms": _quantile(self.latency_s["place"], 0.99) * 1000,
            "M11_preempt_p50_ms": _quantile(self.latency_s["preempt"], 0.5) * 1000,
            "M11_preempt_p99_ms": _quantile(self.latency_s["preempt"], 0.99) * 1000,
            "preemptions": self.preemptions,
        }


def served_load(placed_by_tier: dict[str, int], throughput: dict[str, float]) -> float:
    """Replica-equivalents served: single-GPU replicas serve fully, a tensor-parallel replica
    at its tier's relative throughput (the scenario's stated model; unknown tiers 0.5)."""
    return sum(
        count * (1.0 if label == "tp1" else throughput.get(label, 0.5))
        for label, count in placed_by_tier.items()
    )


def _intact_fraction(snapshot: ClusterSnapshot) -> float:
    """Intact aligned capacity of the free GPUs, as a fraction of an empty cluster's (1.0: no
    fragmentation; it falls as GPUs are used and as the free ones scatter)."""
    kept = whole = 0
    for (shape, free), names in snapshot.free_classes().items():
        kept += len(names) * shape.tier_intact_value(free)
        whole += len(names) * shape.tier_intact_value(shape.full_mask)
    return kept / whole if whole else 0.0


def _rate(pair: list[int] | None) -> float | None:
    if not pair or not pair[1]:
        return None
    return pair[0] / pair[1]


def _mean(values: Any) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def _quantile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

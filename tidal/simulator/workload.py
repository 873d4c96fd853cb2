"""The event stream every policy replays: batch jobs sampled from the openb trace with Poisson
arrivals, and online replica targets that follow the GenAI gateway's daily load shape."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tidal.simulator.data import TracePod
from tidal.simulator.scenario import Scenario


@dataclass(frozen=True, slots=True)
class BatchJob:
    uid: str
    arrival: float
    gpus: int
    cpu_milli: int
    memory_mib: int
    work_s: float  # GPU time the job needs to finish, on its GPUs


@dataclass(frozen=True, slots=True)
class TraceWorkload:
    jobs: tuple[BatchJob, ...]
    hourly_shape: tuple[float, ...]  # online demand per hour of day, peak 1.0
    total_gpus: int

    def online_gpus(self, scenario: Scenario, t: float) -> float:
        """Online GPU demand at time ``t``: the daily shape, interpolated, times the peak."""
        hour = (t / 3600.0) % 24
        low = int(hour)
        frac = hour - low
        shape = self.hourly_shape[low] * (1 - frac) + self.hourly_shape[(low + 1) % 24] * frac
        return scenario.online_peak * self.total_gpus * shape

    def replica_targets(self, scenario: Scenario, t: float) -> dict[str, int]:
        demand = self.online_gpus(scenario, t)
        return {
            s.name: math.ceil(s.share * demand / s.tensor_parallel - 1e-9)
            for s in scenario.services
        }


def build_workload(
    scenario: Scenario,
    trace_pods: list[TracePod],
    hourly_shape: list[float],
    total_gpus: int,
    max_node_gpus: int,
) -> TraceWorkload:
    """Batch jobs whose mean GPU demand is ``batch_load`` of the cluster: an initial backlog at
    t=0 that fills it, then Poisson arrivals at the rate that keeps it there."""
    rng = random.Random(scenario.seed)
    cap = scenario.max_batch_hours * 3600
    usable = [p for p in trace_pods if p.gpus <= max_node_gpus]
    mean_gpu_seconds = sum(p.gpus * min(p.duration_s, cap) for p in usable) / len(usable)
    horizon = scenario.hours * 3600
    rate = scenario.batch_load * total_gpus / mean_gpu_seconds  # arrivals per second
    jobs: list[BatchJob] = []
    backlog = scenario.batch_load * total_gpus
    while backlog > 0:
        job = _job(rng, usable, cap, len(jobs), 0.0)
        backlog -= job.gpus
        jobs.append(job)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon:
            break
        jobs.append(_job(rng, usable, cap, len(jobs), t))
    return TraceWorkload(tuple(jobs), tuple(hourly_shape), total_gpus)


def _job(rng: random.Random, pods: list[TracePod], cap: float, index: int, t: float) -> BatchJob:
    pod = rng.choice(pods)
    return BatchJob(
        uid=f"job-{index:06d}",
        arrival=t,
        gpus=pod.gpus,
        cpu_milli=pod.cpu_milli,
        memory_mib=pod.memory_mib,
        work_s=min(pod.duration_s, cap),
    )

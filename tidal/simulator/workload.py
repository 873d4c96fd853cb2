"""The event stream every policy replays: batch jobs from a trace, either sampled with Poisson
arrivals or at the trace's own submission times, and online demand, either replica targets
that follow a daily load shape or the trace's own online jobs."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tidal.api import LABEL_GPU_MODEL
from tidal.placement import NodeInfo
from tidal.simulator.cluster_model import model_key
from tidal.simulator.scenario import Scenario
from tidal.simulator.traces import SourceReport, TraceJob


@dataclass(frozen=True, slots=True)
class BatchJob:
    uid: str
    arrival: float
    gpus: int  # per worker
    cpu_milli: int
    memory_mib: int
    work_s: float  # GPU time the job needs to finish, on its GPUs
    workers: int = 1  # pods that only run together: a gang when > 1
    gpu_models: frozenset[str] = frozenset()  # GPU model keys it may run on; empty: any

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.workers


@dataclass(frozen=True, slots=True)
class OnlineJob:
    """An online job of the trace (``online: trace``): its workers arrive at ``arrival`` and
    leave ``duration_s`` later, bound or not."""

    uid: str
    arrival: float
    gpus: int  # per worker
    workers: int
    cpu_milli: int
    memory_mib: int
    duration_s: float
    gpu_models: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TraceWorkload:
    jobs: tuple[BatchJob, ...]
    hourly_shape: tuple[float, ...]  # online demand per hour of day, peak 1.0
    total_gpus: int
    online_jobs: tuple[OnlineJob, ...] = ()

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


# Drop reasons decided against the cluster and the replayed window.
TOO_BIG = "more GPUs per worker than any node has"
NO_SUCH_MODEL = "asks for GPU models no node has"
ONLINE_NOT_REPLAYED = "online class: not replayed (online demand follows `services`)"
BEFORE_WINDOW = "submitted before the replayed window (jobs.start_s)"
AFTER_WINDOW = "submitted after the replayed window (hours)"


def node_model(node: NodeInfo) -> str:
    """A node's GPU model key (the trace's name, else its preset's GPU model)."""
    return model_key(node.labels.get(LABEL_GPU_MODEL, node.shape.gpu_model))


def fit_to_cluster(
    jobs: Iterable[TraceJob], nodes: Sequence[NodeInfo], report: SourceReport
) -> list[TraceJob]:
    """The jobs some node can hold (by GPUs per worker and GPU model); the rest are counted in
    ``report`` by reason."""
    largest: dict[str, int] = {}
    for node in nodes:
        model = node_model(node)
        largest[model] = max(largest.get(model, 0), node.shape.gpu_count)
    anywhere = max(largest.values())
    kept = []
    for job in jobs:
        models = job.gpu_models
        if models and not models & largest.keys():
            report.drop(f"{NO_SUCH_MODEL}: {'|'.join(sorted(models))}")
        elif job.gpus > (max(largest.get(m, 0) for m in models) if models else anywhere):
            report.drop(TOO_BIG)
        else:
            kept.append(job)
    return kept


def split_classes(
    scenario: Scenario, jobs: Iterable[TraceJob], report: SourceReport
) -> tuple[list[TraceJob], list[TraceJob]]:
    """(batch jobs, online jobs to replay); online jobs are dropped (and counted) unless the
    scenario replays the trace's online work."""
    batch, online = [], []
    for job in jobs:
        if job.job_class == "batch":
            batch.append(job)
        elif scenario.online == "trace":
            online.append(job)
        else:
            report.drop(ONLINE_NOT_REPLAYED)
    return batch, online


def build_workload(
    scenario: Scenario,
    batch: list[TraceJob],
    hourly_shape: list[float],
    total_gpus: int,
    online: Sequence[TraceJob] = (),
) -> TraceWorkload:
    """The batch jobs (sampled or at their trace times, see the scenario's ``jobs.arrivals``)
    and the trace's online jobs when the scenario replays them."""
    if not batch:
        raise ValueError("no batch jobs to replay")
    if scenario.jobs is not None and scenario.jobs.arrivals == "trace":
        origin = _origin(scenario, [*batch, *online])
        jobs = _at_trace_times(scenario, batch, origin)
        online_jobs = _online_at_trace_times(scenario, online, origin)
        return TraceWorkload(jobs, tuple(hourly_shape), total_gpus, online_jobs)
    return TraceWorkload(_sampled(scenario, batch, total_gpus), tuple(hourly_shape), total_gpus)


def _sampled(scenario: Scenario, pods: list[TraceJob], total_gpus: int) -> tuple[BatchJob, ...]:
    """Batch jobs whose mean GPU demand is ``batch_load`` of the cluster: an initial backlog at
    t=0 that fills it, then Poisson arrivals at the rate that keeps it there."""
    rng = random.Random(scenario.seed)
    cap = scenario.max_batch_hours * 3600
    mean_gpu_seconds = sum(p.total_gpus * min(p.duration_s, cap) for p in pods) / len(pods)
    horizon = scenario.hours * 3600
    rate = scenario.batch_load * total_gpus / mean_gpu_seconds  # arrivals per second
    jobs: list[BatchJob] = []
    backlog = scenario.batch_load * total_gpus
    while backlog > 0:
        job = _job(rng.choice(pods), cap, len(jobs), 0.0)
        backlog -= job.total_gpus
        jobs.append(job)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon:
            break
        jobs.append(_job(rng.choice(pods), cap, len(jobs), t))
    return tuple(jobs)


def _origin(scenario: Scenario, jobs: Sequence[TraceJob]) -> float:
    assert scenario.jobs is not None
    if scenario.jobs.start_s is not None:
        return scenario.jobs.start_s
    return min(j.submit_s for j in jobs if j.submit_s is not None)


def in_window(scenario: Scenario, jobs: Iterable[TraceJob], report: SourceReport) -> list[TraceJob]:
    """With trace arrivals: the jobs submitted inside the replayed window (the rest counted)."""
    jobs = list(jobs)
    if scenario.jobs is None or scenario.jobs.arrivals != "trace" or not jobs:
        return jobs
    origin = _origin(scenario, jobs)
    horizon = scenario.hours * 3600
    kept = []
    for job in jobs:
        assert job.submit_s is not None  # read_jobs requires submission times for trace arrivals
        offset = job.submit_s - origin
        if offset < 0:
            report.drop(BEFORE_WINDOW)
        elif offset >= horizon:
            report.drop(AFTER_WINDOW)
        else:
            kept.append(job)
    return kept


def _at_trace_times(
    scenario: Scenario, batch: list[TraceJob], origin: float
) -> tuple[BatchJob, ...]:
    cap = scenario.max_batch_hours * 3600
    ordered = sorted(batch, key=lambda j: _submitted(j) - origin)
    return tuple(_job(j, cap, i, _submitted(j) - origin) for i, j in enumerate(ordered))


def _online_at_trace_times(
    scenario: Scenario, online: Sequence[TraceJob], origin: float
) -> tuple[OnlineJob, ...]:
    ordered = sorted(online, key=_submitted)
    return tuple(
        OnlineJob(
            uid=f"online-{i:06d}",
            arrival=_submitted(j) - origin,
            gpus=j.gpus,
            workers=j.workers,
            cpu_milli=j.cpu_milli,
            memory_mib=j.memory_mib,
            duration_s=j.duration_s,
            gpu_models=j.gpu_models,
        )
        for i, j in enumerate(ordered)
    )


def _submitted(job: TraceJob) -> float:
    assert job.submit_s is not None
    return job.submit_s


def _job(pod: TraceJob, cap: float, index: int, t: float) -> BatchJob:
    return BatchJob(
        uid=f"job-{index:06d}",
        arrival=t,
        gpus=pod.gpus,
        cpu_milli=pod.cpu_milli,
        memory_mib=pod.memory_mib,
        work_s=min(pod.duration_s, cap),
        workers=pod.workers,
        gpu_models=pod.gpu_models,
    )

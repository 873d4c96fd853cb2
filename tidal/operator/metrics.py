"""Prometheus metrics of the operator, on a registry of its own (``--metrics-port``).

The reconciler hands every reconcile's outcome to :class:`OperatorMetrics`, which keeps the
latest view of each LLMService and LLMBatchJob; a collector exports those views at scrape time,
so an object that goes (deleted, or being deleted) takes its series with it. Gauges come from
the status the reconcile wrote, so a restarted operator exports the same values after its first
reconcile of each object (kopf resumes every object at start).

Goodput is the one counter: GPU-seconds of batch work kept, added when a worker's attempt ends
for good (its pod succeeded or failed, or is gone). An attempt's work is kept when it succeeded
or reported a checkpoint of its own (``tidal.dev/checkpoint``; a worker writes one on SIGTERM);
it counts its GPUs (the job's tensorParallel) times its running time, from its first
container's start to its last container's finish (or, without one, the reconcile that saw it
end). The operator cannot tell when the last checkpoint was written, so work after it is
counted too. It counts from the operator's start: attempts that ended before (found finished by
the first reconcile) are not counted, and the counter resets with the operator.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tidal import api
from tidal.operator.spec import ObservedPod

DEFAULT_PORT = 9403
WORKER_PHASES = ("Pending", "Running", "Waiting", "Succeeded", "Failed")  # status.workers[].state
_FINISHED = ("Succeeded", "Failed")

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class ServiceView:
    desired: int
    ready: int

    @property
    def served_ratio(self) -> float:
        """Ready replicas over desired ones, at most 1; 1 when none is desired."""
        return min(1.0, self.ready / self.desired) if self.desired > 0 else 1.0


@dataclass(frozen=True)
class JobView:
    workers: Mapping[str, int]  # status.workers by state, every WORKER_PHASES state
    preemptions: int


def job_view(status: Mapping[str, Any]) -> JobView:
    workers = dict.fromkeys(WORKER_PHASES, 0)
    for worker in status.get("workers") or ():
        state = str(worker.get("state", "Pending"))
        workers[state] = workers.get(state, 0) + 1
    return JobView(workers, int(status.get("preemptions", 0)))


@dataclass
class Ledger:
    """A job's attempts as the goodput counter needs them: the latest observation of each
    attempt not yet counted, and the attempts counted (kept while their pod or status entry
    may still show them, so a repeated watch event is not counted twice)."""

    seen: dict[str, ObservedPod] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)
    started: bool = False  # the first reconcile set the baseline

    def step(
        self,
        pods: Sequence[ObservedPod],
        gone: Sequence[ObservedPod],
        status: Mapping[str, Any],
        gpus: int,
        now: float,
    ) -> float:
        """GPU-seconds kept by the attempts that ended for good since the last step."""
        present = {p.uid: p for p in pods if p.uid}
        ended = self._ended(present, gone)
        baseline = not self.started
        self.started = True
        kept = 0.0
        for uid, pod in ended.items():
            self.counted.add(uid)
            self.seen.pop(uid, None)
            # Found finished at the first reconcile: it ended before this operator started.
            if not (baseline and uid in present):
                kept += kept_gpu_seconds(pod, gpus, now)
        self.seen.update({u: p for u, p in present.items() if u not in self.counted})
        self.counted &= set(present) | _status_uids(status)
        return kept

    def _ended(
        self, present: Mapping[str, ObservedPod], gone: Sequence[ObservedPod]
    ) -> dict[str, ObservedPod]:
        """Attempts that ended for good and are not counted yet, each as last seen: deleted
        (a watch event, or absent from the list), or finished."""
        ended = {p.uid: p for p in gone if p.uid}
        for uid, last in self.seen.items():
            if uid not in present:
                ended.setdefault(uid, last)
        for uid, pod in present.items():
            if pod.phase in _FINISHED:
                ended.setdefault(uid, pod)
        return {uid: pod for uid, pod in ended.items() if uid not in self.counted}


def _status_uids(status: Mapping[str, Any]) -> set[str]:
    """The attempts the job's status still names (current and last ended, per worker)."""
    out: set[str] = set()
    for worker in status.get("workers") or ():
        out.update(str(worker.get(key) or "") for key in ("uid", "endedUID"))
    return out - {""}


def kept_gpu_seconds(pod: ObservedPod, gpus: int, now: float) -> float:
    """GPUs x running time of an attempt that ended, if its work is kept (succeeded, or
    reported a checkpoint); 0 otherwise or when it never started."""
    if pod.started_at is None or not (pod.phase == "Succeeded" or pod.checkpoint):
        return 0.0
    end = pod.finished_at if pod.finished_at is not None else now
    return gpus * max(0.0, end - pod.started_at)


class OperatorMetrics:
    """The operator's latest view of its objects, and its collector. Reconciles of different
    objects run at once, and scrapes beside them: every method takes the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: dict[Key, ServiceView] = {}
        self.jobs: dict[Key, JobView] = {}
        self.goodput: dict[Key, float] = {}
        self.ledgers: dict[Key, Ledger] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def service(self, namespace: str, name: str, desired: int, status: Mapping[str, Any]) -> None:
        """An LLMService's reconcile: ``desired`` replicas and the status it wrote."""
        view = ServiceView(desired, int(status.get("readyReplicas", 0)))
        with self.lock:
            self.services[(namespace, name)] = view

    def job(
        self,
        namespace: str,
        name: str,
        gpus: int,
        pods: Sequence[ObservedPod],
        gone: Sequence[ObservedPod],
        status: Mapping[str, Any],
        now: float,
    ) -> None:
        """An LLMBatchJob's reconcile: its pods (``gone``: deleted since the last one), the
        status it wrote, ``gpus`` per worker and the time (epoch seconds)."""
        key = (namespace, name)
        with self.lock:
            self.jobs[key] = job_view(status)
            ledger = self.ledgers.setdefault(key, Ledger())
            kept = ledger.step(pods, gone, status, gpus, now)
            self.goodput[key] = self.goodput.get(key, 0.0) + kept

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone (or going): its series go with it."""
        key = (namespace, name)
        with self.lock:
            if kind == api.KIND_LLMSERVICE:
                self.services.pop(key, None)
            else:
                for table in (self.jobs, self.goodput, self.ledgers):
                    table.pop(key, None)

    def families(self) -> Iterator[Metric]:
        with self.lock:
            services, jobs, goodput = dict(self.services), dict(self.jobs), dict(self.goodput)
        yield from _service_families(services)
        yield from _job_families(jobs, goodput)


class _Collector:
    def __init__(self, metrics: OperatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


def _service_families(services: Mapping[Key, ServiceView]) -> Iterable[Metric]:
    replicas = GaugeMetricFamily(
        "tidal_llmservice_replicas",
        "Replicas of each LLMService: desired (spec.replicas within its autoscaling bounds, "
        "after a due schedule entry) and ready (status.readyReplicas).",
        labels=["namespace", "name", "state"],
    )
    ratio = GaugeMetricFamily(
        "tidal_llmservice_served_ratio",
        "Ready replicas of each LLMService over its desired replicas, at most 1 (1 when it "
        "desires none).",
        labels=["namespace", "name"],
    )
    for (namespace, name), view in sorted(services.items()):
        replicas.add_metric([namespace, name, "desired"], view.desired)
        replicas.add_metric([namespace, name, "ready"], view.ready)
        ratio.add_metric([namespace, name], view.served_ratio)
    return replicas, ratio


def _job_families(jobs: Mapping[Key, JobView], goodput: Mapping[Key, float]) -> Iterable[Metric]:
    workers = GaugeMetricFamily(
        "tidal_llmbatchjob_workers",
        "Workers of each LLMBatchJob by the phase its status gives them (Pending, Running, "
        "Waiting: to be recreated after a preemption or failure, Succeeded, Failed).",
        labels=["namespace", "name", "phase"],
    )
    preemptions = GaugeMetricFamily(
        "tidal_llmbatchjob_preemptions",
        "Times the workers of each LLMBatchJob were preempted, evicted or lost with their "
        "node (status.preemptions; kept in the object, so it survives the operator).",
        labels=["namespace", "name"],
    )
    kept = CounterMetricFamily(
        "tidal_batch_goodput_gpu_seconds",
        "GPU-seconds of batch work kept, per LLMBatchJob, since the operator started: for "
        "each worker attempt that ended for good after succeeding or reporting a checkpoint "
        "of its own, tensorParallel GPUs x its running time (first container start to last "
        "container finish, or to when the operator saw it end).",
        labels=["namespace", "name"],
    )
    for (namespace, name), view in sorted(jobs.items()):
        for phase, count in view.workers.items():
            workers.add_metric([namespace, name, phase], count)
        preemptions.add_metric([namespace, name], view.preemptions)
        kept.add_metric([namespace, name], goodput.get((namespace, name), 0.0))
    return workers, preemptions, kept


def serve_metrics(metrics: OperatorMetrics, port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics on ``port`` (0: any free one) from a daemon thread, with
    prometheus_client's HTTP server; the server, to read its port or shut it down."""
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return server

"""Discrete-event replay of one policy on the shared event stream.

Events: batch arrivals and completions, the autoscaler step (online replica targets, metrics
samples), preemptor binds after the victims' grace period, and (``online: trace``) the trace's
online jobs arriving and leaving. Online replicas are placed first; when one fits nowhere the
policy plans a preemption, the victims are evicted at once (their work since the last
checkpoint is lost, the job is requeued) and the preemptor's GPUs are reserved until it binds a
grace period later.

A batch job of several workers is a gang: its pods start together or not at all, carry the
job as their gang (so a planner that counts gangs evicts them whole), and a preemption that
evicts one of them evicts all (a gang cannot run short). A job constrained to GPU models is
placed on the pool of those nodes (:mod:`tidal.simulator.pools`).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tidal.placement import (
    ClusterSnapshot,
    NodeInfo,
    Placement,
    Plan,
    PodInfo,
    PodRequest,
    Policy,
    Reservation,
    TopologyMode,
)
from tidal.simulator.metrics import Metrics, Preemption
from tidal.simulator.pools import ModelPools
from tidal.simulator.scenario import Scenario, ScenarioService
from tidal.simulator.workload import BatchJob, OnlineJob, TraceWorkload
from tidal.topology import Tier

ONLINE_PRIORITY = 1000
BATCH_PRIORITY = 10
CASCADE_WINDOW_S = 600.0


@dataclass
class _Job:
    spec: BatchJob
    remaining_s: float
    epoch: int = 0
    run_start: float | None = None
    preemptions: int = 0
    last_restart: float = -1e18


@dataclass
class _Replica:
    uid: str
    service: ScenarioService
    created: float
    tier: Tier | None = None  # achieved tier once bound
    node: str | None = None
    preempted_at: float | None = None  # when a preemption was carried out for it
    gpu_models: frozenset[str] = frozenset()  # a trace online job's GPU model constraint
    cpu_milli: int | None = None  # a trace online job's request (services: 4 cores per GPU)
    memory_mib: int | None = None


# A batch request: (GPUs per worker, CPU millicores, memory MiB, workers), and the GPU models
# the job is constrained to. Jobs of one shape fit or miss together.
Shape = tuple[tuple[int, int, int, int], frozenset[str]]


class _BatchQueue:
    """Pending batch jobs by request shape, each shape oldest first. Jobs of one shape fit
    or miss together, so a pass tries only the head of each shape."""

    def __init__(self) -> None:
        self._by_shape: dict[Shape, list[tuple[float, str]]] = {}

    def __len__(self) -> int:
        return sum(len(h) for h in self._by_shape.values())

    def push(self, shape: Shape, arrival: float, uid: str) -> None:
        heapq.heappush(self._by_shape.setdefault(shape, []), (arrival, uid))

    def heads(self) -> list[tuple[tuple[float, str], Shape]]:
        return [(heap[0], shape) for shape, heap in self._by_shape.items() if heap]

    def head(self, shape: Shape) -> tuple[float, str] | None:
        heap = self._by_shape.get(shape)
        return heap[0] if heap else None

    def pop(self, shape: Shape) -> tuple[float, str]:
        return heapq.heappop(self._by_shape[shape])

    def pending_by_gpus(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for (size, _), heap in self._by_shape.items():
            if heap:
                counts[size[0]] = counts.get(size[0], 0) + len(heap)
        return counts


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    data: object = field(compare=False, default=None)


class Replay:
    """One policy on one scenario's workload."""

    def __init__(
        self,
        scenario: Scenario,
        nodes: list[NodeInfo],
        workload: TraceWorkload,
        policy: Policy,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.workload = workload
        self.policy = policy
        constraints = [j.gpu_models for j in workload.jobs] + [
            j.gpu_models for j in workload.online_jobs
        ]
        self.cluster = ModelPools(nodes, constraints)
        self.snapshot: ClusterSnapshot = self.cluster.whole
        self.metrics = Metrics(policy.name, workload.total_gpus, scenario)
        self.on_progress = on_progress
        self.jobs = {j.uid: _Job(j, j.work_s) for j in workload.jobs}
        self.job_of = {uid: j.uid for j in workload.jobs for uid in _member_uids(j)}
        self.pending_batch = _BatchQueue()
        self.pending_online: deque[_Replica] = deque()
        # Online trace jobs replace the autoscaled services (scenario field ``online``).
        self.services: tuple[ScenarioService, ...] = (
            () if scenario.online == "trace" else scenario.services
        )
        self.replicas: dict[str, list[_Replica]] = {s.name: [] for s in self.services}
        self.binding: dict[str, tuple[_Replica, Plan]] = {}
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.replica_ids = itertools.count()

    def run(self) -> Metrics:
        horizon = self.scenario.hours * 3600
        for job in self.workload.jobs:
            self._push(job.arrival, "arrive", job.uid)
        for online in self.workload.online_jobs:
            self._push(online.arrival, "online_arrive", online)
        step = 0.0
        while step <= horizon:
            self._push(step, "step")
            step += self.scenario.step_s
        while self.events:
            event = heapq.heappop(self.events)
            if event.time > horizon:
                break
            self.cluster.set_now(event.time)
            getattr(self, f"_on_{event.kind}")(event.data)
        for running in self.jobs.values():  # at the horizon: work done, not finished
            if running.run_start is not None:
                self.metrics.batch_ran((horizon - running.run_start) * running.spec.total_gpus)
        self.metrics.finish(self.snapshot, set(self.binding))
        return self.metrics

    # -- events ------------------------------------------------------------------------------

    def _on_arrive(self, uid: object) -> None:
        job = self.jobs[str(uid)].spec
        self.pending_batch.push(_shape_of(job), job.arrival, job.uid)
        self._schedule_batch()

    def _on_done(self, data: object) -> None:
        assert isinstance(data, tuple)
        uid, epoch = str(data[0]), int(data[1])
        job = self.jobs[uid]
        if job.epoch != epoch or job.run_start is None:
            return  # preempted since this completion was planned
        for member in _member_uids(job.spec):
            self.cluster.remove_pod(member)
        self.metrics.job_completed(job.spec, self.snapshot.now)
        self.metrics.batch_ran((self.snapshot.now - job.run_start) * job.spec.total_gpus)
        job.run_start = None
        job.remaining_s = 0
        self._schedule_batch()

    def _on_step(self, _: object) -> None:
        now = self.snapshot.now
        if self.on_progress:
            self.on_progress(now)
        self.cluster.expire_reservations()
        if self.services:
            self._autoscale(self.workload.replica_targets(self.scenario, now))
        self._schedule_online()
        self._schedule_batch()
        pending = (len(self.pending_online) + len(self.binding), len(self.pending_batch))
        self.metrics.sample(now, self.snapshot, self._placed_by_tier(), pending)

    def _on_online_arrive(self, data: object) -> None:
        """A trace online job arrives: one replica per worker, placed (or preempted for) now."""
        assert isinstance(data, OnlineJob)
        service = _trace_service(data)
        replicas = [
            _Replica(
                uid,
                service,
                self.snapshot.now,
                gpu_models=data.gpu_models,
                cpu_milli=data.cpu_milli,
                memory_mib=data.memory_mib,
            )
            for uid in _worker_uids(data.uid, data.workers)
        ]
        self.replicas[service.name] = replicas
        self.pending_online.extend(replicas)
        self._push(self.snapshot.now + data.duration_s, "online_leave", service.name)
        self._schedule_online()

    def _on_online_leave(self, name: object) -> None:
        for replica in self.replicas.pop(str(name), []):
            self._scale_down(replica)
        self._schedule_batch()

    def _on_bind(self, uid: object) -> None:
        replica, plan = self.binding.pop(str(uid))
        self.cluster.release(replica.uid)
        if replica not in self.replicas.get(replica.service.name, ()):
            self.metrics.preemptor_outcome(None)  # scaled down while waiting: a wasted preemption
            self._schedule_batch()
            return
        if plan.gpus & ~self.snapshot.free_gpus(plan.node, replica.uid):
            self.metrics.double_allocations += 1  # must stay zero: reservations prevent it
            self.metrics.preemptor_outcome(None)
            replica.preempted_at = None  # counted as failed; a later bind is an ordinary one
            self.pending_online.append(replica)
            return
        self._bind_replica(replica, plan.node, plan.gpus)

    # -- online ------------------------------------------------------------------------------

    def _autoscale(self, targets: dict[str, int]) -> None:
        for service in self.services:
            running = self.replicas[service.name]
            target = targets[service.name]
            while len(running) < target:
                uid = f"{service.name}-{next(self.replica_ids)}"
                replica = _Replica(uid, service, created=self.snapshot.now)
                running.append(replica)
                self.pending_online.append(replica)
            while len(running) > target:
                self._scale_down(running.pop())

    def _scale_down(self, replica: _Replica) -> None:
        if replica in self.pending_online:
            self.pending_online.remove(replica)
        elif replica.node is not None:
            self.cluster.remove_pod(replica.uid)

    def _schedule_online(self) -> None:
        for _ in range(len(self.pending_online)):
            replica = self.pending_online.popleft()
            if not self._place_online(replica):
                self.pending_online.append(replica)

    def _place_online(self, replica: _Replica) -> bool:
        request = _online_request(replica)
        view = self.cluster.view(replica.gpu_models)
        started = time.perf_counter()
        placement = self.policy.place(view, request)
        self.metrics.decision("place", time.perf_counter() - started)
        if placement is not None:
            self._bind_replica(replica, placement.node, placement.gpus)
            return True
        started = time.perf_counter()
        plan = self.policy.preempt(view, request)
        self.metrics.decision("preempt", time.perf_counter() - started)
        if not isinstance(plan, Plan):
            return False
        self._carry_out(replica, request, plan)
        return True

    def _carry_out(self, replica: _Replica, request: PodRequest, plan: Plan) -> None:
        now = self.snapshot.now
        lost = 0.0
        victims = [self.snapshot.pods[uid] for uid in plan.victims]
        for victim in victims:
            if victim.priority >= request.priority or not victim.preemptible:
                self.metrics.priority_inversions += 1
        hit = dict.fromkeys(self.job_of[v.uid] for v in victims)  # jobs, in victim order
        for job_uid in hit:
            lost += self._evict(job_uid)
        chosen = set(plan.victims)
        self.metrics.broken_gangs += sum(
            1 for job_uid in hit if not chosen.issuperset(_member_uids(self.jobs[job_uid].spec))
        )
        shape = self.snapshot.nodes[plan.node].info.shape
        workloads = len({v.workload or v.uid for v in victims})
        gpus = sum(v.gpu_count for v in victims)
        self.metrics.preemption(Preemption(request, plan, shape, gpus, workloads, lost))
        replica.preempted_at = now
        expiry = now + self.scenario.grace_period_s * 4
        self.cluster.reserve(Reservation(replica.uid, plan.node, plan.gpus, frozenset(), expiry))
        self.binding[replica.uid] = (replica, plan)
        self._push(now + self.scenario.grace_period_s, "bind", replica.uid)

    def _bind_replica(self, replica: _Replica, node: str, gpus: int) -> None:
        now = self.snapshot.now
        shape = self.snapshot.nodes[node].info.shape
        service = replica.service
        preempted = replica.preempted_at is not None
        if replica.preempted_at is not None:
            self.metrics.preemptor_outcome(now - replica.preempted_at)
        aligned = shape.is_aligned(gpus, service.tier)
        self.metrics.online_bound_at(service.mode, aligned, now - replica.created, preempted)
        pod = PodInfo(
            uid=replica.uid,
            name=replica.uid,
            node=node,
            gpus=gpus,
            priority=ONLINE_PRIORITY,
            preemptible=False,
            workload=replica.service.name,
            start_time=self.snapshot.now,
        )
        self.cluster.add_pod(pod)
        replica.node, replica.tier = node, shape.tier_of(gpus)

    def _placed_by_tier(self) -> tuple[int, dict[str, int]]:
        """(replicas demanded, bound replicas by the tier they achieved; "tp1" for single-GPU
        replicas, which no tier slows down). Kept per step, so the report can re-weigh served
        load under any throughput model without replaying."""
        demanded = 0
        placed: dict[str, int] = {}
        for running in self.replicas.values():
            demanded += len(running)
            for replica in running:
                if replica.node is None or replica.tier is None:
                    continue
                label = "tp1" if replica.service.tensor_parallel == 1 else replica.tier.label
                placed[label] = placed.get(label, 0) + 1
        return demanded, placed

    # -- batch -------------------------------------------------------------------------------

    def _schedule_batch(self) -> None:
        """One scheduling pass over the pending batch jobs, oldest first. Like kube-scheduler's
        unschedulable queue, a job that does not fit is set aside and the next one is tried, so
        a big job never blocks small ones behind it. Jobs of a shape that missed, or of a shape
        needing at least as much of everything on the same GPU models, wait for the next pass
        (they would miss too)."""
        queue = self.pending_batch
        heads = queue.heads()
        heapq.heapify(heads)
        failed: dict[frozenset[str], list[tuple[int, int, int, int]]] = {}  # by GPU models
        while heads:
            _, shape = heapq.heappop(heads)
            size, models = shape
            missed = failed.setdefault(models, [])
            if any(_needs_as_much(size, miss) for miss in missed):
                continue
            arrival, uid = queue.pop(shape)
            if not self._try_start(self.jobs[uid]):
                queue.push(shape, arrival, uid)  # back to the head of its shape
                missed.append(size)
                continue
            head = queue.head(shape)
            if head is not None:
                heapq.heappush(heads, (head, shape))

    def _try_start(self, job: _Job) -> bool:
        """Place every worker of the job on free resources, or none: a gang whose last worker
        fits nowhere gives back the GPUs its first ones took."""
        spec = job.spec
        view = self.cluster.view(spec.gpu_models)
        if spec.workers > 1 and _worker_slots(view, spec.gpus) < spec.workers:
            return False  # not enough free GPUs for every worker: skip placing and undoing
        gang = spec.uid if spec.workers > 1 else None
        placed: list[PodInfo] = []
        for member in _member_uids(spec):
            request = PodRequest(
                member,
                member,
                spec.gpus,
                BATCH_PRIORITY,
                spec.cpu_milli,
                spec.memory_mib,
                TopologyMode.NONE,
                Tier.NODE,
                gang,
            )
            started = time.perf_counter()
            placement = self.policy.place(view, request)
            self.metrics.decision("place", time.perf_counter() - started)
            if placement is None:
                for pod in placed:
                    self.cluster.remove_pod(pod.uid)
                return False
            placed.append(self._batch_pod(spec, member, placement, gang))
            self.cluster.add_pod(placed[-1])
        self._started(job)
        return True

    def _batch_pod(
        self, spec: BatchJob, uid: str, placement: Placement, gang: str | None
    ) -> PodInfo:
        return PodInfo(
            uid=uid,
            name=uid,
            node=placement.node,
            gpus=placement.gpus,
            priority=BATCH_PRIORITY,
            cpu_milli=spec.cpu_milli,
            memory_mib=spec.memory_mib,
            gang=gang,
            workload=spec.uid,
            start_time=self.snapshot.now,
            checkpoint_interval_s=self.scenario.checkpoint_interval_s,
        )

    def _started(self, job: _Job) -> None:
        now = self.snapshot.now
        job.epoch += 1
        job.run_start = now
        job.last_restart = now
        self._push(now + job.remaining_s, "done", (job.spec.uid, job.epoch))

    def _evict(self, uid: str) -> float:
        """Evict a batch job, every worker of it; returns the GPU-seconds of work it loses."""
        now = self.snapshot.now
        pods = [self.cluster.remove_pod(member) for member in _member_uids(self.jobs[uid].spec)]
        job = self.jobs[uid]
        assert job.run_start is not None
        ran = now - job.run_start
        self.metrics.batch_ran(ran * job.spec.total_gpus)
        saved = pods[0].last_saved(now) - job.run_start  # workers checkpoint together
        job.remaining_s -= saved
        job.preemptions += 1
        if now - job.last_restart < CASCADE_WINDOW_S and job.preemptions > 1:
            self.metrics.cascades += 1
        job.run_start = None
        job.epoch += 1
        self.pending_batch.push(_shape_of(job.spec), job.spec.arrival, uid)  # keeps its place
        return (ran - saved) * job.spec.total_gpus

    def _push(self, at: float, kind: str, data: object = None) -> None:
        heapq.heappush(self.events, _Event(at, next(self.seq), kind, data))


def _shape_of(job: BatchJob) -> Shape:
    return (job.gpus, job.cpu_milli, job.memory_mib, job.workers), job.gpu_models


def _needs_as_much(size: tuple[int, ...], miss: tuple[int, ...]) -> bool:
    """Whether a request of ``size`` asks for at least what ``miss`` (which did not fit on the
    same GPU models) asked, so that it cannot fit either."""
    return all(n >= f for n, f in zip(size, miss, strict=True))


def _worker_slots(snapshot: ClusterSnapshot, gpus: int) -> int:
    """How many workers of ``gpus`` GPUs the free GPUs could hold, node by node (an upper
    bound: CPU, memory and reservations can only lower it)."""
    return sum(
        len(names) * (free.bit_count() // gpus)
        for (_, free), names in snapshot.free_classes().items()
    )


def _member_uids(job: BatchJob) -> tuple[str, ...]:
    return _worker_uids(job.uid, job.workers)


def _worker_uids(uid: str, workers: int) -> tuple[str, ...]:
    """The pod uid of each worker (a single worker's pod is the job itself)."""
    if workers == 1:
        return (uid,)
    return tuple(f"{uid}/{i}" for i in range(workers))


def _trace_service(job: OnlineJob) -> ScenarioService:
    """A trace online job as a service of its own: one replica per worker. Multi-GPU workers
    prefer NVLink (best-effort: a trace does not say what its jobs need)."""
    if job.gpus == 1:
        return ScenarioService(job.uid, 1, 0.0, TopologyMode.NONE, Tier.NODE)
    return ScenarioService(job.uid, job.gpus, 0.0, TopologyMode.BEST_EFFORT, Tier.NVLINK)


def _online_request(replica: _Replica) -> PodRequest:
    service = replica.service
    cpu = replica.cpu_milli
    memory = replica.memory_mib
    return PodRequest(
        uid=replica.uid,
        name=replica.uid,
        gpus=service.tensor_parallel,
        priority=ONLINE_PRIORITY,
        cpu_milli=4000 * service.tensor_parallel if cpu is None else cpu,
        memory_mib=32_768 * service.tensor_parallel if memory is None else memory,
        mode=service.mode,
        tier=service.tier,
    )

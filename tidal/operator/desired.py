"""The desired state of one LLMService / LLMBatchJob (pure): from its parsed spec, its observed
pods, its previous status and the time, which pods to create and delete, the status to write,
the Events to post and, for a service whose schedule entry came due, the replicas to set.

The kopf layer reads the object and its pods, calls ``plan_service`` / ``plan_job`` and applies
the answer (``Reconciler._apply``). Nothing here does I/O, and it is deterministic, so a
reconcile interrupted anywhere and run again (by a restarted operator) plans the same pod names:
creating one twice is a 409, never a duplicate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

from tidal.operator.pods import (
    job_pod,
    job_pod_name,
    service_pod,
)
from tidal.operator.spec import (
    Autoscaling,
    LLMBatchJobSpec,
    LLMServiceSpec,
    ObservedPod,
    WorkloadSpec,
)

Condition = dict[str, Any]
# A pod the scheduler cannot place for longer than this (with no node being freed for it by a
# preemption) is reported on its owner: a pod waits a few seconds while a scale-up settles,
# and reporting each of those would only be noise.
UNSCHEDULABLE_GRACE_S = 30
# Condition messages name at most this many pods, then "and N more": a 1,000-replica service
# must not grow a status without bound. Each pod's reason is cut to REASON_CHARS.
MESSAGE_PODS = 3
REASON_CHARS = 240
# Degraded reasons that no retry can cure: only a new generation of the spec (or a restarted
# operator) tries again. See refused().
PERMANENT_REASONS = ("InvalidSpec", "PodRejected")


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class DesiredState:
    """What one reconcile makes true; ``Reconciler._apply`` carries it out in this order: the
    scale, the pod deletions, the pod creations, the status, the Events."""

    # spec.replicas to set (services only: a schedule entry came due); None leaves the spec.
    replicas: int | None = None
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    # Pods on a deleted node: no kubelet will ever confirm a graceful deletion, so they are
    # deleted at once (grace 0) instead of lingering until the pod garbage collector.
    force_delete: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


def condition(kind: str, true: bool, reason: str, message: str = "") -> Condition:
    return {
        "type": kind,
        "status": "True" if true else "False",
        "reason": reason,
        "message": message,
    }


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Condition], now: str, generation: int
) -> list[Condition]:
    """New conditions keep their lastTransitionTime while their status does not change."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for cond in new:
        before = previous.get(cond["type"])
        unchanged = before is not None and before.get("status") == cond["status"]
        since = before.get("lastTransitionTime", now) if before and unchanged else now
        merged.append({**cond, "lastTransitionTime": since, "observedGeneration": generation})
    return merged


def _seconds(stamp: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def stuck(pods: Sequence[ObservedPod], now: str) -> list[ObservedPod]:
    """Live pods the scheduler has not placed for UNSCHEDULABLE_GRACE_S, nor is freeing a node
    for (a nominated node: victims are terminating). Without a transition time, at once."""
    current = _seconds(now)
    out = []
    for pod in pods:
        if not pod.live or not pod.unschedulable or pod.nominated:
            continue
        since = _seconds(pod.unschedulable_since)
        if since is None or current is None or current - since >= UNSCHEDULABLE_GRACE_S:
            out.append(pod)
    return out


def _cut(text: str, limit: int = REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_pods(named: Sequence[tuple[str, str]], limit: int = MESSAGE_PODS) -> str:
    """ "a (why), b (why) and 7 more" from (pod, reason) pairs: bounded whatever their number."""
    parts = [f"{name} ({_cut(why)})" if why else name for name, why in named[:limit]]
    text = ", ".join(parts)
    more = len(named) - limit
    return f"{text} and {more} more" if more > 0 else text


def _scheduling(pods: Sequence[ObservedPod]) -> str:
    return describe_pods([(p.name, p.scheduling_message or "no reason given") for p in pods])


def dropped_keys_event(workload: WorkloadSpec) -> Event | None:
    """Said when pods are built: reserved podMetadata keys (an object stored before the CRD
    refused them) are left off, never copied."""
    if not workload.dropped_keys:
        return None
    keys = ", ".join(workload.dropped_keys)
    return Event(
        "Warning",
        "ReservedPodMetadata",
        _cut(f"spec.podMetadata {keys}: not copied onto pods (reserved prefixes)", 1024),
    )


# -- failures the planners cannot plan around -----------------------------------------------
def failed_status(
    previous: Mapping[str, Any], generation: int, reason: str, message: str, now: str
) -> dict[str, Any]:
    """The status fields to patch when a reconcile cannot go on: phase Degraded, and a
    Degraded condition with ``reason`` and ``message``; the other conditions stay. Degraded,
    not Failed: pods already running keep running, and a fixed spec recovers the object."""
    before = previous.get("conditions") or ()
    others = [dict(c) for c in before if c.get("type") != "Degraded"]
    degraded = condition("Degraded", True, reason, _cut(message, 1024))
    conditions = [*others, *merge_conditions(before, [degraded], now, generation)]
    return {"observedGeneration": generation, "phase": "Degraded", "conditions": conditions}


def already_reported(previous: Mapping[str, Any], failed: Mapping[str, Any]) -> bool:
    """``failed`` (from failed_status) says nothing the previous status did not: the same
    Degraded reason and message for the same generation. Its Event is then not posted again
    (a create handler and the first timer tick that race on a new object, a restart)."""

    def degraded(status: Mapping[str, Any]) -> tuple[Any, ...] | None:
        for cond in status.get("conditions") or ():
            if cond.get("type") == "Degraded" and cond.get("status") == "True":
                return cond.get("reason"), cond.get("message"), cond.get("observedGeneration")
        return None

    return degraded(previous) is not None and degraded(previous) == degraded(failed)


# Progressing reasons of an object that only an event (a pod placed, a spec changed) moves
# on: its timer need not reconcile it (see needs_tick).
SETTLED_REASONS = ("Stable", "WorkersRunning", "Unschedulable", "Finished")


def needs_tick(obj: Mapping[str, Any]) -> bool:
    """Whether the timer should reconcile ``obj`` now, from the object alone (kopf's cached
    copy, no API call): only while something that time alone changes is under way (a
    scale-up, pods pending within UNSCHEDULABLE_GRACE_S). An idle 1,024-worker job then costs
    its timer nothing but this check; the reconciler still resyncs every object now and then."""
    status = obj.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") or refused(obj):
        return False
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    failure = conditions.get("Degraded") or {}
    if failure.get("status") == "True" and failure.get("reason") not in (
        *PERMANENT_REASONS,
        "Unschedulable",
    ):
        return True  # a failed reconcile (an API error) to retry
    progressing = conditions.get("Progressing")
    if progressing is None:
        return True
    generation = (obj.get("metadata") or {}).get("generation")
    current = progressing.get("observedGeneration") == generation
    return not current or progressing.get("reason") not in SETTLED_REASONS


def refused(obj: Mapping[str, Any]) -> bool:
    """The object's current generation was already refused for good (an invalid spec, a pod
    the API server rejects): timers and pod events leave it alone until the spec changes."""
    generation = (obj.get("metadata") or {}).get("generation")
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Degraded" and cond.get("status") == "True":
            return (
                cond.get("reason") in PERMANENT_REASONS
                and cond.get("observedGeneration") == generation
            )
    return False


# -- the schedule (a daily tide of replica targets) -----------------------------------------
def schedule_slot(autoscaling: Autoscaling, now: dt.datetime) -> tuple[str, int] | None:
    """The schedule entry in force at ``now``: (a key naming its day and time, its replicas).

    An entry applies from its time until the next one; before the day's first entry the
    previous day's last entry holds. None without a schedule.
    """
    if not autoscaling.schedule:
        return None
    local = now.astimezone(ZoneInfo(autoscaling.time_zone))
    minute = local.hour * 60 + local.minute
    today = [e for e in autoscaling.schedule if e.minute_of_day <= minute]
    entry, day = (
        (today[-1], local.date())
        if today
        else (autoscaling.schedule[-1], local.date() - dt.timedelta(days=1))
    )
    return f"{day.isoformat()}T{entry.at}", autoscaling.clamp(entry.replicas)


def scheduled_replicas(
    autoscaling: Autoscaling | None, now: dt.datetime, applied_slot: str
) -> tuple[str, int] | None:
    """A new replica target when a schedule entry not yet applied is in force, else None.

    Like a cron autoscaler: an entry is applied once, when its time comes, so `kubectl scale`
    (or an HPA) holds until the next entry.
    """
    if autoscaling is None:
        return None
    slot = schedule_slot(autoscaling, now)
    if slot is None or slot[0] == applied_slot:
        return None
    return slot


@dataclass(frozen=True)
class ScheduleStep:
    """A schedule entry come due: the slot it fills (``status.scheduleSlot`` afterwards) and
    the replicas it sets on the spec."""

    slot: str
    replicas: int

    def event(self) -> Event:
        return Event("Normal", "Scheduled", f"schedule {self.slot}: {self.replicas} replicas")


def schedule_step(
    service: LLMServiceSpec, now: dt.datetime, status: Mapping[str, Any]
) -> ScheduleStep | None:
    """The schedule entry to apply at ``now``, or None when the one in force was applied
    already (``status.scheduleSlot``) or the service has no schedule."""
    due = scheduled_replicas(service.autoscaling, now, status.get("scheduleSlot", ""))
    return None if due is None else ScheduleStep(*due)


def scheduled(service: LLMServiceSpec, step: ScheduleStep | None) -> LLMServiceSpec:
    """``service`` as it reads once ``step`` is applied: the spec is not parsed again."""
    return service if step is None else replace(service, replicas=step.replicas)


# -- LLMService -----------------------------------------------------------------------------
def scale_down_order(
    pods: Sequence[ObservedPod], node_free_gpus: Mapping[str, int], wanted_tier: str
) -> list[ObservedPod]:
    """Replicas in the order to remove them: first the ones that serve nobody (unbound, not
    ready), then those placed below the wanted tier, then the ones whose GPUs join the most
    already-free GPUs on their node (so freed GPUs become whole blocks, not scattered ones)."""

    def key(pod: ObservedPod) -> tuple[bool, bool, bool, int, int]:
        aligned = pod.tier == wanted_tier or not pod.tier
        return (pod.bound, pod.ready, aligned, -node_free_gpus.get(pod.node, 0), -pod.index)

    return sorted(pods, key=key)


def _free_indices(taken: set[int], count: int) -> list[int]:
    indices: list[int] = []
    candidate = 0
    while len(indices) < count:
        if candidate not in taken:
            indices.append(candidate)
        candidate += 1
    return indices


def _placements(pods: Sequence[ObservedPod]) -> list[dict[str, Any]]:
    return [
        {
            "index": p.index,
            "pod": p.name,
            "node": p.node,
            "gpus": p.gpus,
            "tier": p.tier,
            "phase": p.phase,
        }
        for p in sorted(pods, key=lambda p: p.index)
    ]


def _rolling_victim(
    live: Sequence[ObservedPod], current_hash: str, desired: int, ordered: Sequence[ObservedPod]
) -> ObservedPod | None:
    """One replica of an older spec to replace, only while every replica is ready (one
    unavailable at a time, as a Deployment with maxUnavailable 1, maxSurge 0)."""
    if len(live) != desired or not all(p.ready for p in live):
        return None
    outdated = [p for p in ordered if p.spec_hash != current_hash]
    return outdated[0] if outdated else None


def plan_service(
    service: LLMServiceSpec,
    pods: Sequence[ObservedPod],
    node_free_gpus: Mapping[str, int],
    previous_status: Mapping[str, Any],
    now: str,
    gone: Sequence[ObservedPod] = (),
    step: ScheduleStep | None = None,
) -> DesiredState:
    """Apply a due schedule ``step`` (see schedule_step) to spec.replicas; create missing
    replicas, remove surplus and finished ones, roll outdated ones; status."""
    service = scheduled(service, step)
    live = [p for p in pods if p.live]
    delete, force_delete, retired = _retirements(service, pods, live, node_free_gpus)
    create, added = _additions(service, pods, live)
    state = DesiredState(
        replicas=None if step is None else step.replicas,
        create=create,
        delete=delete,
        force_delete=force_delete,
        events=[*([step.event()] if step else []), *retired, *added],
    )
    state.status = {
        **_service_status(service, live, gone, previous_status, state, now),
        **_schedule_slot(previous_status, step),
    }
    return state


def _retirements(
    service: LLMServiceSpec,
    pods: Sequence[ObservedPod],
    live: Sequence[ObservedPod],
    node_free_gpus: Mapping[str, int],
) -> tuple[list[str], list[str], list[Event]]:
    """(pods to delete, pods to force-delete, Events): finished replicas, those on a deleted
    node, the surplus, and one outdated replica at a time."""
    desired = service.desired_replicas()
    delete = [p.name for p in pods if not p.terminating and not p.live and not p.lost]
    ordered = scale_down_order(live, node_free_gpus, service.workload.topology_tier)
    surplus = ordered[: max(0, len(live) - desired)]
    delete += [p.name for p in surplus]
    events = []
    victim = _rolling_victim(live, service.workload.spec_hash(), desired, ordered)
    if victim is not None:
        delete.append(victim.name)
        events.append(Event("Normal", "RollingUpdate", f"replacing {victim.name}"))
    if surplus:
        names = ", ".join(p.name for p in surplus)
        events.append(Event("Normal", "ScaledDown", f"removed {names} (to {desired})"))
    return delete, [p.name for p in pods if p.lost], events


def _additions(
    service: LLMServiceSpec, pods: Sequence[ObservedPod], live: Sequence[ObservedPod]
) -> tuple[list[dict[str, Any]], list[Event]]:
    """(pods to create, Events): the missing replicas, at the lowest indices no pod holds."""
    desired = service.desired_replicas()
    missing = max(0, desired - len(live))
    taken = {p.index for p in pods}
    create = [service_pod(service, i) for i in _free_indices(taken, missing)]
    events = [Event("Normal", "ScaledUp", f"creating {missing} (to {desired})")] if missing else []
    dropped = dropped_keys_event(service.workload) if create else None
    return create, [*events, *([dropped] if dropped else [])]


def _schedule_slot(previous: Mapping[str, Any], step: ScheduleStep | None) -> dict[str, Any]:
    """The schedule entry last applied, kept in the status: ``step``'s once it is due."""
    if step is not None:
        return {"scheduleSlot": step.slot}
    return {"scheduleSlot": previous["scheduleSlot"]} if "scheduleSlot" in previous else {}


def _service_status(
    service: LLMServiceSpec,
    live: Sequence[ObservedPod],
    gone: Sequence[ObservedPod],
    previous: Mapping[str, Any],
    state: DesiredState,
    now: str,
) -> dict[str, Any]:
    workload, desired = service.workload, service.desired_replicas()
    ready = sum(p.ready for p in live)
    updated = sum(p.spec_hash == workload.spec_hash() for p in live)
    unplaced = stuck(live, now)
    changing = bool(state.create or state.delete or state.force_delete)
    changing = changing or updated < len(live) or ready < desired
    conditions = _service_conditions(desired, ready, unplaced, changing)
    return {
        "observedGeneration": workload.generation,
        "phase": _service_phase(desired, ready, bool(unplaced)),
        "replicas": len(live),
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": f"{workload.owner_label}={workload.name}",
        "preemptions": int(previous.get("preemptions", 0)) + sum(p.disrupted for p in gone),
        "placements": _placements(live),
        "conditions": merge_conditions(
            previous.get("conditions") or (), conditions, now, workload.generation
        ),
    }


def _service_phase(desired: int, ready: int, unplaced: bool) -> str:
    if desired == 0:
        return "ScaledToZero"
    if ready >= desired:
        return "Ready"
    return "Degraded" if unplaced else "Progressing"


def _service_conditions(
    desired: int, ready: int, unplaced: Sequence[ObservedPod], changing: bool
) -> list[Condition]:
    if unplaced:
        # Not progressing, and why: the scheduler's own words (extender refusals included).
        progressing = condition("Progressing", False, "Unschedulable", _scheduling(unplaced))
    else:
        progressing = condition("Progressing", changing, "Reconciling" if changing else "Stable")
    return [
        condition(
            "Ready",
            ready >= desired,
            "ReplicasReady" if ready >= desired else "ReplicasNotReady",
            f"{ready}/{desired} replicas ready",
        ),
        progressing,
        condition(
            "Degraded",
            bool(unplaced),
            "Unschedulable" if unplaced else "AsExpected",
            f"{len(unplaced)} cannot be placed: {_scheduling(unplaced)}" if unplaced else "",
        ),
    ]


# -- LLMBatchJob ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Worker:
    """What the job's status remembers of worker ``index`` across its attempts."""

    index: int
    attempt: int = 0  # of the pod now counted; 0 before the first one exists
    uid: str = ""
    ended_uid: str = ""  # the last attempt whose end was already counted
    state: str = "Pending"  # Pending | Running | Waiting | Succeeded | Failed
    checkpoint: str = ""
    preemptions: int = 0
    failures: int = 0
    node: str = ""
    gpus: str = ""
    tier: str = ""

    @classmethod
    def from_status(cls, entry: Mapping[str, Any]) -> Worker:
        return cls(
            index=int(entry["index"]),
            attempt=int(entry.get("attempt", 0)),
            uid=entry.get("uid", ""),
            ended_uid=entry.get("endedUID", ""),
            state=entry.get("state", "Pending"),
            checkpoint=entry.get("checkpoint", ""),
            preemptions=int(entry.get("preemptions", 0)),
            failures=int(entry.get("failures", 0)),
        )

    def to_status(self, pod_name: str) -> dict[str, Any]:
        return {
            "index": self.index,
            "attempt": self.attempt,
            "uid": self.uid,
            "endedUID": self.ended_uid,
            "state": self.state,
            "checkpoint": self.checkpoint,
            "preemptions": self.preemptions,
            "failures": self.failures,
            "pod": pod_name,
            "node": self.node,
            "gpus": self.gpus,
            "tier": self.tier,
        }


def _count_end(worker: Worker, pod: ObservedPod) -> tuple[Worker, Event | None]:
    """Account once for how ``pod`` (this worker's attempt) ended."""
    if worker.ended_uid == pod.uid:
        return worker, None
    checkpoint = pod.checkpoint or worker.checkpoint
    ended = replace(worker, ended_uid=pod.uid, checkpoint=checkpoint, node="", gpus="", tier="")
    if pod.phase == "Succeeded":
        return replace(ended, state="Succeeded"), None
    if pod.phase == "Failed" and not pod.disrupted:
        message = f"worker {worker.index} attempt {pod.attempt} ({pod.name}) failed"
        return replace(ended, state="Waiting", failures=worker.failures + 1), Event(
            "Warning", "WorkerFailed", message
        )
    # Preempted, evicted, deleted or lost with its node: not the job's fault, so no backoff
    # is used up.
    where = f" from {checkpoint}" if checkpoint else " from the start"
    if pod.terminating and not pod.lost and pod.phase in ("Pending", "Running"):
        # Still in its grace period: the checkpoint it writes now is the one it resumes from.
        where = " from the last checkpoint it reports before it stops"
    if pod.lost:
        reason, what = "NodeLost", f"lost with its node {pod.node}"
    else:
        reason, what = "Preempted", "preempted"
    message = f"worker {worker.index} ({pod.name}) {what}; resumes{where}"
    return replace(ended, state="Waiting", preemptions=worker.preemptions + 1), Event(
        "Normal", reason, message
    )


def _step_worker(
    job: str, worker: Worker, pods: Sequence[ObservedPod]
) -> tuple[Worker, ObservedPod | None, list[Event]]:
    """Fold this worker's pods into its record; return it and its live pod, if any."""
    events = []
    for pod in sorted(pods, key=lambda p: p.attempt):
        if pod.attempt >= worker.attempt:
            worker = replace(worker, attempt=pod.attempt, uid=pod.uid)
        if pod.checkpoint and pod.attempt == worker.attempt:
            worker = replace(worker, checkpoint=pod.checkpoint)
        if (pod.terminating or not pod.live) and pod.uid == worker.uid:
            worker, event = _count_end(worker, pod)
            events += [event] if event else []
    live = next((p for p in pods if p.live and p.uid == worker.uid), None)
    if live is not None:
        state = "Running" if live.phase == "Running" else "Pending"
        worker = replace(worker, state=state, node=live.node, gpus=live.gpus, tier=live.tier)
    elif worker.uid and worker.ended_uid != worker.uid and all(p.uid != worker.uid for p in pods):
        # The pod vanished while nobody watched (operator down): a disruption, not a failure.
        worker, event = _count_end(worker, _vanished(job, worker))
        events += [event] if event else []
    return worker, live, events


def _vanished(job: str, worker: Worker) -> ObservedPod:
    """The worker's counted attempt, seen going although no pod of it is left."""
    return ObservedPod(
        name=job_pod_name(job, worker.index, worker.attempt),
        uid=worker.uid,
        index=worker.index,
        phase="Unknown",
        attempt=worker.attempt,
        terminating=True,
    )


def _job_verdict(job: LLMBatchJobSpec, workers: Sequence[Worker]) -> tuple[str, str, str]:
    """(phase, reason, message) of the whole job."""
    failures = sum(w.failures for w in workers)
    preemptions = sum(w.preemptions for w in workers)
    if all(w.state == "Succeeded" for w in workers):
        return "Succeeded", "Completed", f"{len(workers)} workers succeeded"
    if failures > job.backoff_limit:
        return (
            "Failed",
            "BackoffLimitExceeded",
            (f"{failures} failures exceed backoffLimit {job.backoff_limit}"),
        )
    if job.max_preemptions is not None and preemptions > job.max_preemptions:
        return (
            "Failed",
            "MaxPreemptionsExceeded",
            (f"{preemptions} preemptions exceed maxPreemptions {job.max_preemptions}"),
        )
    if any(w.state == "Running" for w in workers):
        return "Running", "WorkersRunning", ""
    return "Pending", "WaitingForGPUs", ""


def plan_job(
    job: LLMBatchJobSpec,
    pods: Sequence[ObservedPod],
    previous_status: Mapping[str, Any],
    now: str,
    gone: Sequence[ObservedPod] = (),
) -> DesiredState:
    """Keep one live pod per unfinished worker, resuming each from its last checkpoint;
    count failures against backoffLimit and preemptions apart; decide completion.

    ``gone`` are pods deleted since the last reconcile, as their watch event last showed them
    (with the DisruptionTarget condition and the checkpoint written during the grace period).
    """
    workers, lives, ended = _fold_workers(job, pods, gone, previous_status)
    verdict = _job_verdict(job, workers)
    create, delete = _job_pod_changes(job, workers, lives, pods, verdict[0], previous_status)
    dropped = dropped_keys_event(job.workload) if create else None
    state = DesiredState(
        create=create,
        delete=delete,
        force_delete=[p.name for p in pods if p.lost],
        events=[*ended, *([dropped] if dropped else []), *_finish_events(verdict, previous_status)],
    )
    state.status = _job_status(job, workers, lives, previous_status, *verdict, now)
    return state


def _fold_workers(
    job: LLMBatchJobSpec,
    pods: Sequence[ObservedPod],
    gone: Sequence[ObservedPod],
    previous: Mapping[str, Any],
) -> tuple[list[Worker], dict[int, ObservedPod | None], list[Event]]:
    """Each worker's record and live pod, from its previous record and its pods (``gone``
    ones too), and the Events of the attempts that ended."""
    known = {int(e["index"]): Worker.from_status(e) for e in previous.get("workers") or ()}
    by_index: dict[int, list[ObservedPod]] = {}
    for pod in (*pods, *gone):  # grouped once: a 1,024-worker job is not planned in O(n²)
        by_index.setdefault(pod.index, []).append(pod)
    workers, lives, events = [], {}, []
    for index in range(job.parallelism):
        mine = by_index.get(index, [])
        worker, live, ended = _step_worker(job.workload.name, known.get(index, Worker(index)), mine)
        workers.append(worker)
        lives[index] = live
        events += ended
    return workers, lives, events


def _job_pod_changes(
    job: LLMBatchJobSpec,
    workers: Sequence[Worker],
    lives: Mapping[int, ObservedPod | None],
    pods: Sequence[ObservedPod],
    phase: str,
    previous: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[str]]:
    """(pods to create, pods to delete): a job failing now stops its live workers; a job not
    finished before gets its missing workers back."""
    if phase == "Failed":
        return [], [p.name for p in pods if p.live]
    if previous.get("phase") in ("Succeeded", "Failed"):
        return [], []
    return _replacements(job, workers, lives, pods), []


def _finish_events(verdict: tuple[str, str, str], previous: Mapping[str, Any]) -> list[Event]:
    """The Event of a job that finishes now (once: not again on a later reconcile)."""
    phase, reason, message = verdict
    if phase == previous.get("phase") or phase not in ("Succeeded", "Failed"):
        return []
    return [Event("Normal" if phase == "Succeeded" else "Warning", reason, message or phase)]


def _replacements(
    job: LLMBatchJobSpec,
    workers: Sequence[Worker],
    lives: Mapping[int, ObservedPod | None],
    pods: Sequence[ObservedPod],
) -> list[dict[str, Any]]:
    """A new attempt for each unfinished worker with no pod, once its old pod is gone (its
    checkpoint is written during the grace period)."""
    going = {p.index for p in pods if p.terminating and not p.lost}
    create = []
    for worker in workers:
        if worker.state == "Succeeded" or lives[worker.index] or worker.index in going:
            continue
        create.append(job_pod(job, worker.index, worker.attempt + 1, worker.checkpoint))
    return create


def _job_status(
    job: LLMBatchJobSpec,
    workers: Sequence[Worker],
    lives: Mapping[int, ObservedPod | None],
    previous: Mapping[str, Any],
    phase: str,
    reason: str,
    message: str,
    now: str,
) -> dict[str, Any]:
    unplaced = stuck([p for p in lives.values() if p is not None], now)
    conditions = _job_conditions(workers, phase, reason, message, unplaced)
    status: dict[str, Any] = {
        "observedGeneration": job.workload.generation,
        "phase": phase,
        "active": sum(1 for live in lives.values() if live is not None),
        "succeeded": sum(w.state == "Succeeded" for w in workers),
        "failed": sum(w.failures for w in workers),
        "preemptions": sum(w.preemptions for w in workers),
        "workers": [
            w.to_status(lives[w.index].name if lives[w.index] else "")  # type: ignore[union-attr]
            for w in workers
        ],
        "conditions": merge_conditions(
            previous.get("conditions") or (), conditions, now, job.workload.generation
        ),
        "startTime": previous.get("startTime") or now,
    }
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = previous.get("completionTime") or now
    return status


def _job_progressing(
    workers: Sequence[Worker], phase: str, unplaced: Sequence[ObservedPod]
) -> Condition:
    if unplaced:
        # Batch work waits for GPUs by design; this says what the scheduler answers meanwhile.
        return condition("Progressing", False, "Unschedulable", _scheduling(unplaced))
    if phase in ("Succeeded", "Failed"):
        return condition("Progressing", False, "Finished")
    if all(w.state in ("Running", "Succeeded") for w in workers):
        return condition("Progressing", True, "WorkersRunning")
    return condition("Progressing", True, "WaitingForGPUs")


def _job_conditions(
    workers: Sequence[Worker],
    phase: str,
    reason: str,
    message: str,
    unplaced: Sequence[ObservedPod],
) -> list[Condition]:
    # Preempted workers not running again yet (their new pod waits for GPUs).
    waiting = [w for w in workers if w.preemptions and w.state in ("Waiting", "Pending")]
    return [
        condition(
            "Complete",
            phase == "Succeeded",
            reason if phase == "Succeeded" else "Running",
            message if phase == "Succeeded" else "",
        ),
        condition(
            "Failed",
            phase == "Failed",
            reason if phase == "Failed" else "AsExpected",
            message if phase == "Failed" else "",
        ),
        condition(
            "Preempted",
            bool(waiting),
            "PreemptedByScheduler" if waiting else "Running",
            describe_pods([(f"worker {w.index}", "") for w in waiting]) + " waiting to resume"
            if waiting
            else "",
        ),
        _job_progressing(workers, phase, unplaced),
        # Cleared here once a reconcile goes through again (see failed_status).
        condition("Degraded", False, "AsExpected"),
    ]

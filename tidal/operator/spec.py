"""Typed views of LLMService / LLMBatchJob objects and of the pods the operator owns (pure).

The API server has already applied the CRD defaults and validated the schema and CEL rules, so
parsing here fills what a schema cannot default (a topology mode given without a tier), checks
what a schema cannot (an IANA time zone, the operator's configured PriorityClasses) and what an
object stored before a stricter CRD may still carry, and turns camelCase dictionaries into
frozen dataclasses the planners can reason about. A spec that cannot be run raises SpecError,
naming the field.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidal import api
from tidal.operator.crds import (
    DEFAULT_IMAGE,
    LABEL_VALUE_PATTERN,
    MAX_NAME_LENGTH,
    QUANTITY_PATTERN,
    RESERVED_KEY_PATTERN,
    WORKLOAD_TIERS,
    allowed_priority_classes,
)

_RESERVED_KEY = re.compile(RESERVED_KEY_PATTERN)
_QUANTITY = re.compile(QUANTITY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)
# A PersistentVolumeClaim's name: a DNS-1123 subdomain (the pod's volume refers to it).
_CLAIM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SpecError(ValueError):
    """The spec cannot be run as it is: ``field`` (a path such as spec.resources.cpu) and the
    problem. Permanent: nothing changes until the spec does."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def reserved_key(key: str) -> bool:
    """A label / annotation key users may not set on worker pods (see RESERVED_KEY_PATTERN)."""
    return _RESERVED_KEY.match(key) is not None


def user_metadata(values: Mapping[str, Any] | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """podMetadata labels or annotations without the reserved keys: (kept, dropped keys).

    The CRD refuses reserved keys, but an object stored before that rule may carry them, and
    the operator must never let a user forge what the extender trusts (tidal.dev/reservation,
    tidal.dev/gpus) or what the operator finds its pods by (tidal.dev/llmservice)."""
    kept = {str(k): str(v) for k, v in (values or {}).items() if not reserved_key(str(k))}
    dropped = tuple(sorted(str(k) for k in values or {} if reserved_key(str(k))))
    return kept, dropped


def check_quantity(field: str, value: Any) -> str:
    """A positive Kubernetes quantity as text, else SpecError (the pod create would be a 422)."""
    text = str(value)
    if isinstance(value, bool) or _QUANTITY.match(text) is None:
        raise SpecError(field, f"{text!r} is not a quantity such as 500m, 4 or 32Gi")
    mantissa = re.match(r"\+?[0-9.]*", text)
    if mantissa is None or not re.search(r"[1-9]", mantissa.group()):
        raise SpecError(field, f"{text!r} must be more than zero")
    return text


def label_value_ok(text: str) -> bool:
    """``text`` can be a label value (an object's name is its pods' owner label)."""
    return len(text) <= MAX_NAME_LENGTH and _LABEL_VALUE.match(text) is not None


def check_name(name: str) -> str:
    """The object's name, if its pods can carry it as a label (the CRD checks the length of new
    objects; one stored before that rule cannot be run)."""
    if not label_value_ok(name):
        raise SpecError(
            "metadata.name",
            f"{len(name)} characters: at most {MAX_NAME_LENGTH} (it is its pods' label value)",
        )
    return name


def controller_of(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(kind, name, uid) of the tidal object controlling ``pod`` (its controller
    ownerReference), or None. Labels can be set by anyone who creates pods; the controller
    reference is what the operator itself wrote."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller") and ref.get("apiVersion") == api.API_VERSION:
            return str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


def check_model_uri(uri: str) -> str:
    """The model URI, if its pod can be built: a pvc:// URI must name a claim the pod can
    mount (the CRD checks the scheme and the path's segments, not the claim's name)."""
    claim = api.model_claim(uri)
    if claim is not None and (len(claim[0]) > 253 or _CLAIM_NAME.match(claim[0]) is None):
        raise SpecError(
            "spec.model.uri",
            f"{claim[0]!r} is not a PersistentVolumeClaim name (pvc://<claim>/<path>, the claim "
            "in lowercase letters, digits, '-' and '.')",
        )
    return uri


def check_time_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        # Without a time zone database (no /usr/share/zoneinfo, no tzdata package) every name
        # is unknown: say that, not that the user's zone is wrong.
        problem = (
            f"{name!r} is not an IANA time zone (e.g. Europe/Berlin)"
            if zoneinfo.available_timezones()
            else f"{name!r} cannot be checked: the operator has no time zone database (tzdata)"
        )
        raise SpecError("spec.autoscaling.timeZone", problem) from error
    return name


@dataclass(frozen=True)
class WorkloadSpec:
    """What LLMService and LLMBatchJob have in common: how one worker pod looks."""

    kind: str
    name: str
    namespace: str
    uid: str
    generation: int
    model_name: str
    model_uri: str
    dtype: str
    attention: str
    tensor_parallel: int
    priority_class: str
    cpu: str
    memory: str
    image: str
    args: tuple[str, ...]
    topology_mode: str
    topology_tier: str
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    dropped_keys: tuple[str, ...] = ()  # reserved podMetadata keys not copied onto the pods

    @property
    def owner_label(self) -> str:
        return api.LABEL_LLMSERVICE if self.kind == api.KIND_LLMSERVICE else api.LABEL_LLMBATCHJOB

    def spec_hash(self) -> str:
        """Changes whenever the pod template would: replicas made from an older spec are
        replaced one at a time."""
        skip = ("uid", "generation", "name", "dropped_keys")
        template = {k: v for k, v in self.__dict__.items() if k not in skip}
        text = json.dumps(template, sort_keys=True, default=dict)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ScheduleEntry:
    minute_of_day: int
    at: str
    replicas: int


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    time_zone: str = "UTC"
    schedule: tuple[ScheduleEntry, ...] = ()

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class LLMServiceSpec:
    """An LLMService's spec, parsed."""

    workload: WorkloadSpec
    replicas: int
    port: int
    autoscaling: Autoscaling | None

    def desired_replicas(self) -> int:
        return self.autoscaling.clamp(self.replicas) if self.autoscaling else self.replicas


@dataclass(frozen=True)
class LLMBatchJobSpec:
    """An LLMBatchJob's spec, parsed."""

    workload: WorkloadSpec
    parallelism: int
    input_uri: str
    output_uri: str
    checkpoint_interval_s: int
    backoff_limit: int
    max_preemptions: int | None


def _priority_class(kind: str, name: str | None, extra: tuple[str, ...]) -> str:
    allowed = allowed_priority_classes(kind, extra)
    if not name:
        return allowed[0]
    if name not in allowed:
        raise SpecError(
            "spec.priorityClassName",
            f"{name!r} is not allowed for {kind}; use one of "
            + ", ".join(allowed)
            + " (the operator's TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES adds more)",
        )
    return name


def _workload(obj: Mapping[str, Any], kind: str, mode: str, extra: tuple[str, ...]) -> WorkloadSpec:
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    model = spec.get("model", {})
    topology = spec.get("topology") or {}
    resources = spec.get("resources") or {}
    pod_meta = spec.get("podMetadata") or {}
    tier = topology.get("tier", "nvlink")
    if tier not in WORKLOAD_TIERS:
        raise SpecError(
            "spec.topology.tier",
            f"{tier!r} is not one of {', '.join(WORKLOAD_TIERS)} "
            "('rack' applies to gangs, and each replica / worker is one pod)",
        )
    labels, dropped_labels = user_metadata(pod_meta.get("labels"))
    annotations, dropped_notes = user_metadata(pod_meta.get("annotations"))
    return WorkloadSpec(
        kind=kind,
        name=check_name(meta["name"]),
        namespace=meta.get("namespace", "default"),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        model_name=model["name"],
        model_uri=check_model_uri(model["uri"]),
        dtype=model.get("dtype", api.DEFAULT_DTYPE),
        attention=model.get("attention", api.DEFAULT_ATTENTION),
        tensor_parallel=int(spec.get("tensorParallel", 1)),
        priority_class=_priority_class(kind, spec.get("priorityClassName"), extra),
        cpu=check_quantity("spec.resources.cpu", resources.get("cpu", "4")),
        memory=check_quantity("spec.resources.memory", resources.get("memory", "32Gi")),
        image=spec.get("image") or DEFAULT_IMAGE,
        args=tuple(spec.get("args") or ()),
        topology_mode=topology.get("mode", mode),
        topology_tier=tier,
        pod_labels=labels,
        pod_annotations=annotations,
        dropped_keys=(
            *(f"labels[{k}]" for k in dropped_labels),
            *(f"annotations[{k}]" for k in dropped_notes),
        ),
    )


def _minute_of_day(at: str) -> int:
    hours, minutes = at.split(":")
    return int(hours) * 60 + int(minutes)


def _autoscaling(spec: Mapping[str, Any] | None) -> Autoscaling | None:
    if not spec:
        return None
    entries = sorted(
        (
            ScheduleEntry(_minute_of_day(e["at"]), e["at"], int(e["replicas"]))
            for e in spec.get("schedule") or ()
        ),
        key=lambda e: e.minute_of_day,
    )
    return Autoscaling(
        min_replicas=int(spec.get("minReplicas", 0)),
        max_replicas=int(spec["maxReplicas"]),
        time_zone=check_time_zone(spec.get("timeZone", "UTC")),
        schedule=tuple(entries),
    )


def parse_service(
    obj: Mapping[str, Any], extra_priority_classes: tuple[str, ...] = ()
) -> LLMServiceSpec:
    """``extra_priority_classes``: the operator's configured PriorityClasses beyond tidal's."""
    spec = obj.get("spec", {})
    return LLMServiceSpec(
        workload=_workload(obj, api.KIND_LLMSERVICE, "guaranteed", extra_priority_classes),
        replicas=int(spec.get("replicas", 1)),
        port=int(spec.get("port", 8000)),
        autoscaling=_autoscaling(spec.get("autoscaling")),
    )


def parse_job(
    obj: Mapping[str, Any], extra_priority_classes: tuple[str, ...] = ()
) -> LLMBatchJobSpec:
    spec = obj.get("spec", {})
    limit = spec.get("maxPreemptions")
    return LLMBatchJobSpec(
        workload=_workload(obj, api.KIND_LLMBATCHJOB, "best-effort", extra_priority_classes),
        parallelism=int(spec.get("parallelism", 1)),
        input_uri=spec["input"]["uri"],
        output_uri=spec["output"]["uri"],
        checkpoint_interval_s=int(spec.get("checkpointIntervalSeconds", 600)),
        backoff_limit=int(spec.get("backoffLimit", 3)),
        max_preemptions=None if limit is None else int(limit),
    )


@dataclass(frozen=True)
class ObservedPod:
    """The facts about one owned pod that the planners use."""

    name: str
    uid: str
    index: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    terminating: bool = False
    disrupted: bool = False  # a DisruptionTarget condition: preempted or evicted
    # PodScheduled False: the scheduler found no place (Unschedulable) or refused the pod
    # (SchedulerError, e.g. the extender rejecting its annotations); its message and since when.
    unschedulable: bool = False
    scheduling_message: str = ""
    unschedulable_since: str = ""
    nominated: bool = False  # a node is being freed for it (preemption under way)
    lost: bool = False  # its node was deleted: it runs nowhere, whatever its phase says
    node: str = ""
    gpus: str = ""
    tier: str = ""
    spec_hash: str = ""
    attempt: int = 0
    checkpoint: str = ""
    # When its first container started, and when its last one finished (None while any
    # runs): its running time, for the goodput metric. Epoch seconds.
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def bound(self) -> bool:
        return bool(self.node)

    @property
    def live(self) -> bool:
        """Counts as a replica: neither going away, finished, nor on a deleted node."""
        return not (self.terminating or self.lost) and self.phase not in ("Succeeded", "Failed")


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or ():
        if condition.get("type") == kind:
            return condition  # type: ignore[no-any-return]
    return None


def _epoch(stamp: object) -> float | None:
    """An RFC 3339 time as epoch seconds; None when absent or unreadable."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _running_time(status: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(when the first container started, when the last one finished, None while any has
    not) from the pod's container statuses."""
    started: list[float] = []
    finished: list[float] = []
    statuses = status.get("containerStatuses") or ()
    for container in statuses:
        state = container.get("state") or {}
        phase = state.get("terminated") or state.get("running") or {}
        if (begun := _epoch(phase.get("startedAt"))) is not None:
            started.append(begun)
        if (ended := _epoch((state.get("terminated") or {}).get("finishedAt"))) is not None:
            finished.append(ended)
    done = bool(statuses) and len(finished) == len(statuses)
    return (min(started) if started else None), (max(finished) if done else None)


def observe_pod(pod: Mapping[str, Any]) -> ObservedPod:
    """An ObservedPod from a pod as the API returns it (a dict)."""
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    ready = _condition(status, "Ready")
    disruption = _condition(status, "DisruptionTarget")
    scheduled = _condition(status, "PodScheduled") or {}
    unschedulable = scheduled.get("status") == "False" and scheduled.get("reason") in (
        "Unschedulable",
        "SchedulerError",
    )
    started, finished = _running_time(status)
    return ObservedPod(
        name=meta["name"],
        uid=meta.get("uid", ""),
        index=int(labels.get(api.LABEL_INDEX, "-1")),
        phase=status.get("phase", "Pending"),
        ready=bool(ready and ready.get("status") == "True"),
        terminating=meta.get("deletionTimestamp") is not None,
        disrupted=bool(disruption and disruption.get("status") == "True"),
        unschedulable=unschedulable,
        scheduling_message=str(scheduled.get("message") or "") if unschedulable else "",
        unschedulable_since=str(scheduled.get("lastTransitionTime") or "") if unschedulable else "",
        nominated=bool(status.get("nominatedNodeName")),
        node=(pod.get("spec") or {}).get("nodeName") or "",
        gpus=notes.get(api.ANNOTATION_GPUS, ""),
        tier=notes.get(api.ANNOTATION_TOPOLOGY_ACHIEVED, ""),
        spec_hash=notes.get(api.ANNOTATION_SPEC_HASH, ""),
        attempt=int(notes.get(api.ANNOTATION_ATTEMPT, "0")),
        checkpoint=notes.get(api.ANNOTATION_CHECKPOINT, ""),
        started_at=started,
        finished_at=finished,
    )

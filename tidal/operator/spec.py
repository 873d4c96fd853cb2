"""Typed views of LLMService / LLMBatchJob objects and of the pods the operator owns (pure).

The API server has already applied the CRD defaults and validated the schema and CEL rules, so
parsing here only fills what a schema cannot default (a topology mode given without a tier) and
turns camelCase dictionaries into frozen dataclasses the planners can reason about.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidal.operator.crds import (
    BATCH_PRIORITY_CLASS,
    DEFAULT_IMAGE,
    ONLINE_PRIORITY_CLASS,
)

PREFIX = "tidal.dev/"
SERVICE_LABEL = f"{PREFIX}llmservice"
JOB_LABEL = f"{PREFIX}llmbatchjob"
INDEX_LABEL = f"{PREFIX}index"
GPUS_ANNOTATION = f"{PREFIX}gpus"
ACHIEVED_TIER_ANNOTATION = f"{PREFIX}topology-achieved"
CHECKPOINT_ANNOTATION = f"{PREFIX}checkpoint"
ATTEMPT_ANNOTATION = f"{PREFIX}attempt"
SPEC_HASH_ANNOTATION = f"{PREFIX}spec-hash"


@dataclass(frozen=True)
class Workload:
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

    @property
    def owner_label(self) -> str:
        return SERVICE_LABEL if self.kind == "LLMService" else JOB_LABEL

    def spec_hash(self) -> str:
        """Changes whenever the pod template would: replicas made from an older spec are
        replaced one at a time."""
        template = {
            k: v for k, v in self.__dict__.items() if k not in ("uid", "generation", "name")
        }
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
class ServiceSpec:
    workload: Workload
    replicas: int
    port: int
    autoscaling: Autoscaling | None

    def desired_replicas(self) -> int:
        return self.autoscaling.clamp(self.replicas) if self.autoscaling else self.replicas


@dataclass(frozen=True)
class JobSpec:
    workload: Workload
    parallelism: int
    input_uri: str
    output_uri: str
    checkpoint_interval_s: int
    backoff_limit: int
    max_preemptions: int | None


def _workload(obj: Mapping[str, Any], kind: str, mode: str, priority: str) -> Workload:
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    model = spec.get("model", {})
    topology = spec.get("topology") or {}
    resources = spec.get("resources") or {}
    pod_meta = spec.get("podMetadata") or {}
    return Workload(
        kind=kind,
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        model_name=model["name"],
        model_uri=model["uri"],
        dtype=model.get("dtype", "bfloat16"),
        attention=model.get("attention", "int8"),
        tensor_parallel=int(spec.get("tensorParallel", 1)),
        priority_class=spec.get("priorityClassName") or priority,
        cpu=str(resources.get("cpu", "4")),
        memory=str(resources.get("memory", "32Gi")),
        image=spec.get("image") or DEFAULT_IMAGE,
        args=tuple(spec.get("args") or ()),
        topology_mode=topology.get("mode", mode),
        topology_tier=topology.get("tier", "nvlink"),
        pod_labels=dict(pod_meta.get("labels") or {}),
        pod_annotations=dict(pod_meta.get("annotations") or {}),
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
        time_zone=spec.get("timeZone", "UTC"),
        schedule=tuple(entries),
    )


def parse_service(obj: Mapping[str, Any]) -> ServiceSpec:
    spec = obj.get("spec", {})
    return ServiceSpec(
        workload=_workload(obj, "LLMService", "guaranteed", ONLINE_PRIORITY_CLASS),
        replicas=int(spec.get("replicas", 1)),
        port=int(spec.get("port", 8000)),
        autoscaling=_autoscaling(spec.get("autoscaling")),
    )


def parse_job(obj: Mapping[str, Any]) -> JobSpec:
    spec = obj.get("spec", {})
    limit = spec.get("maxPreemptions")
    return JobSpec(
        workload=_workload(obj, "LLMBatchJob", "best-effort", BATCH_PRIORITY_CLASS),
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
    unschedulable: bool = False
    node: str = ""
    gpus: str = ""
    tier: str = ""
    spec_hash: str = ""
    attempt: int = 0
    checkpoint: str = ""

    @property
    def bound(self) -> bool:
        return bool(self.node)

    @property
    def live(self) -> bool:
        """Counts as a replica: neither going away nor finished."""
        return not self.terminating and self.phase not in ("Succeeded", "Failed")


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or ():
        if condition.get("type") == kind:
            return condition  # type: ignore[no-any-return]
    return None


def observe_pod(pod: Mapping[str, Any]) -> ObservedPod:
    """An ObservedPod from a pod as the API returns it (a dict)."""
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    ready = _condition(status, "Ready")
    disruption = _condition(status, "DisruptionTarget")
    scheduled = _condition(status, "PodScheduled")
    return ObservedPod(
        name=meta["name"],
        uid=meta.get("uid", ""),
        index=int(labels.get(INDEX_LABEL, "-1")),
        phase=status.get("phase", "Pending"),
        ready=bool(ready and ready.get("status") == "True"),
        terminating=meta.get("deletionTimestamp") is not None,
        disrupted=bool(disruption and disruption.get("status") == "True"),
        unschedulable=bool(
            scheduled
            and scheduled.get("status") == "False"
            and scheduled.get("reason") == "Unschedulable"
        ),
        node=(pod.get("spec") or {}).get("nodeName") or "",
        gpus=notes.get(GPUS_ANNOTATION, ""),
        tier=notes.get(ACHIEVED_TIER_ANNOTATION, ""),
        spec_hash=notes.get(SPEC_HASH_ANNOTATION, ""),
        attempt=int(notes.get(ATTEMPT_ANNOTATION, "0")),
        checkpoint=notes.get(CHECKPOINT_ANNOTATION, ""),
    )

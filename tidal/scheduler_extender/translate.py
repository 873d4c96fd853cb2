"""Kubernetes objects (as parsed JSON) to the placement core's values, with field-named errors.

Annotations read here (prefix ``tidal.dev/``): ``gpus`` (GPU indices written at bind),
``topology-mode`` and ``topology-tier`` (the request; default best-effort at nvlink),
``checkpoint-interval-seconds`` (lost-work model). A preemptor's plan is the pod *condition*
``tidal.dev/reservation`` (JSON in its message): pod status is written only by holders of
``pods/status`` (the API server resets it on create and ignores it on update), so a user who may
create or edit pods cannot forge one, as they could an annotation.
Node topology comes from the node agent's GPUTopology object (named after the node), else from
the node label ``tidal.dev/topology-preset``.

Objects come from the API server but their annotations are free text anyone with pod access can
write, so every read of one is defensive: a bad value is an ``ObjectError`` naming the field,
never any other exception.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import orjson

from tidal import api
from tidal.placement import NodeInfo, PodInfo, PodRequest, Reservation, TopologyMode
from tidal.topology import (
    NodeShape,
    Tier,
    TopologyError,
    bits,
    build_topology,
    compile_shape,
    mask_of,
    preset_shape,
)

# kube's system-node-critical / system-cluster-critical start here; never victims of tidal.
SYSTEM_PRIORITY = 1_000_000_000

_T = TypeVar("_T")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


class ObjectError(ValueError):
    """A Kubernetes object the extender cannot use; the message names the field."""

    def __init__(self, kind: str, name: str, field: str, problem: str) -> None:
        super().__init__(f"{kind} {name}: field '{field}': {problem}")
        self.field = field


def quantity(value: object, field: str, owner: str) -> float:
    """A Kubernetes resource quantity ("500m", "4Gi", "2", "1e3") as a float in base units."""
    match = _QUANTITY.match(str(value).strip())
    if match is None or match.group(2) not in _SUFFIX:
        raise ObjectError("pod", owner, field, f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _resources(containers: list[dict[str, Any]], owner: str, key: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    if not isinstance(containers, list):
        raise ObjectError("pod", owner, "spec.containers", "expected a list")
    for i, container in enumerate(containers):
        where = f"spec.containers[{i}].resources"
        resources = container.get("resources") if isinstance(container, dict) else None
        resources = resources if isinstance(resources, dict) else {}
        limits, requests = resources.get("limits") or {}, resources.get(key) or {}
        if not isinstance(limits, dict) or not isinstance(requests, dict):
            raise ObjectError("pod", owner, where, "limits and requests must be objects")
        # Extended resources must have requests == limits; kube defaults requests from limits.
        merged = {**limits, **requests}
        for name, value in merged.items():
            field = f"spec.containers[{i}].resources.{key}.{name}"
            totals[name] = totals.get(name, 0.0) + quantity(value, field, owner)
    return totals


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def pod_gpus(pod: dict[str, Any]) -> int:
    """Whole GPUs the pod asks for (containers summed; init containers run before, so max)."""
    owner = pod_key(pod)
    spec = _section(pod, "spec", owner)
    main = _resources(spec.get("containers") or [], owner, "requests").get(api.GPU_RESOURCE, 0.0)
    init = max(
        (
            _resources([c], owner, "requests").get(api.GPU_RESOURCE, 0.0)
            for c in _list(spec.get("initContainers"), "spec.initContainers", owner)
        ),
        default=0.0,
    )
    return int(max(main, init))


def _list(value: object, field: str, owner: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError("pod", owner, field, "expected a list")
    return value


def _cpu_memory(pod: dict[str, Any]) -> tuple[int, int]:
    owner = pod_key(pod)
    totals = _resources(_section(pod, "spec", owner).get("containers") or [], owner, "requests")
    return int(totals.get("cpu", 0.0) * 1000), int(totals.get("memory", 0.0) / 2**20)


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata")
    notes = meta.get("annotations") if isinstance(meta, dict) else None
    return notes if isinstance(notes, dict) else {}


def _section(obj: dict[str, Any], key: str, owner: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ObjectError("pod", owner, key, f"expected an object, got {type(value).__name__}")
    return value


def _priority(spec: dict[str, Any], owner: str) -> int:
    value = spec.get("priority")
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ObjectError("pod", owner, "spec.priority", f"expected an integer, got {value!r}")
    return value


def checkpoint_interval(pod: dict[str, Any]) -> float | None:
    """Seconds between the pod's checkpoints (its annotation), None when it does not say."""
    text = annotations_of(pod).get(api.ANNOTATION_CHECKPOINT_INTERVAL)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ObjectError(
            "pod",
            pod_key(pod),
            f"metadata.annotations[{api.ANNOTATION_CHECKPOINT_INTERVAL}]",
            f"expected a positive number of seconds, got {text!r}",
        )
    return value


def pod_request(pod: dict[str, Any]) -> PodRequest:
    """What an unbound pod asks of the placement core."""
    key = pod_key(pod)
    meta = _section(pod, "metadata", key)
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ObjectError("pod", key, "metadata.uid", "missing")
    gpus = pod_gpus(pod)
    if gpus < 1:
        raise ObjectError("pod", key, f"resources.{api.GPU_RESOURCE}", "the pod requests no GPUs")
    notes = annotations_of(pod)
    mode_text = notes.get(api.ANNOTATION_TOPOLOGY_MODE, TopologyMode.BEST_EFFORT.value)
    try:
        mode = TopologyMode(mode_text)
    except (TypeError, ValueError) as error:
        choices = ", ".join(m.value for m in TopologyMode)
        raise ObjectError(
            "pod",
            key,
            f"metadata.annotations[{api.ANNOTATION_TOPOLOGY_MODE}]",
            f"{mode_text!r} is not one of {choices}",
        ) from error
    try:
        tier = Tier.parse(str(notes.get(api.ANNOTATION_TOPOLOGY_TIER, Tier.NVLINK.label)))
    except (TopologyError, ValueError) as error:
        raise ObjectError(
            "pod", key, f"metadata.annotations[{api.ANNOTATION_TOPOLOGY_TIER}]", str(error)
        ) from error
    if tier is Tier.RACK:
        raise ObjectError(
            "pod",
            key,
            f"metadata.annotations[{api.ANNOTATION_TOPOLOGY_TIER}]",
            "'rack' applies to gangs only",
        )
    cpu, memory = _cpu_memory(pod)
    return PodRequest(
        uid=uid,
        name=key,
        gpus=gpus,
        priority=_priority(_section(pod, "spec", key), key),
        cpu_milli=cpu,
        memory_mib=memory,
        mode=mode,
        tier=tier,
    )


def parse_gpu_list(text: str, owner: str, gpu_count: int) -> int:
    """The ``tidal.dev/gpus`` annotation ("0,1,2,3") as a mask on a node of ``gpu_count``."""
    try:
        return mask_of(api.parse_gpu_list(text, gpu_count))
    except ValueError as error:
        field = f"metadata.annotations[{api.ANNOTATION_GPUS}]"
        raise ObjectError("pod", owner, field, str(error)) from error


def format_gpu_list(mask: int) -> str:
    return api.format_gpu_list(bits(mask))


def timestamp(text: object) -> float | None:
    """An RFC 3339 time as epoch seconds; None when absent or unreadable (the callers fall
    back to another time: a wrong start time only skews the lost-work estimate)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def is_terminal(pod: dict[str, Any]) -> bool:
    status = pod.get("status")
    return isinstance(status, dict) and status.get("phase") in ("Succeeded", "Failed")


def _controller(meta: dict[str, Any]) -> str | None:
    refs = meta.get("ownerReferences")
    for ref in refs if isinstance(refs, list) else []:
        if isinstance(ref, dict) and ref.get("controller") and isinstance(ref.get("uid"), str):
            return str(ref["uid"])
    return None


def pod_info(pod: dict[str, Any], gpus: int) -> tuple[PodInfo, list[ObjectError]]:
    """A bound pod holding ``gpus`` (a mask on its node), and the problems of its optional
    fields: a bad one is left at its default, so the GPUs stay accounted whatever it says."""
    key = pod_key(pod)
    problems: list[ObjectError] = []

    def lenient(read: Callable[[], _T], default: _T) -> _T:
        try:
            return read()
        except ObjectError as error:
            problems.append(error)
            return default

    empty: dict[str, Any] = {}
    meta = lenient(lambda: _section(pod, "metadata", key), empty)
    spec = lenient(lambda: _section(pod, "spec", key), empty)
    status = lenient(lambda: _section(pod, "status", key), empty)
    # A pod whose priority cannot be read is nobody's victim.
    priority = lenient(lambda: _priority(spec, key), SYSTEM_PRIORITY)
    cpu, memory = lenient(lambda: _cpu_memory(pod), (0, 0))
    started = timestamp(status.get("startTime")) or timestamp(meta.get("creationTimestamp"))
    info = PodInfo(
        uid=str(meta["uid"]),
        name=key,
        node=str(spec["nodeName"]),
        gpus=gpus,
        priority=priority,
        cpu_milli=cpu,
        memory_mib=memory,
        preemptible=priority < SYSTEM_PRIORITY,
        workload=_controller(meta),
        start_time=started or 0.0,
        checkpoint_interval_s=lenient(lambda: checkpoint_interval(pod), None),
    )
    return info, problems


def node_info(node: dict[str, Any], published: NodeShape | None = None) -> NodeInfo:
    """A Node with a known topology as the core's NodeInfo; ObjectError says what is missing.
    The topology is the node agent's GPUTopology (``published``) when there is one, else the
    preset named by the node's ``tidal.dev/topology-preset`` label (nodes without an agent)."""
    meta = node.get("metadata") or {}
    name = meta.get("name", "?")
    labels = meta.get("labels") or {}
    preset = labels.get(api.LABEL_TOPOLOGY_PRESET)
    if published is not None:
        shape = published
    elif preset is None:
        raise ObjectError(
            "node",
            name,
            f"metadata.labels[{api.LABEL_TOPOLOGY_PRESET}]",
            "no GPU topology known for the node (no GPUTopology object, no preset label)",
        )
    else:
        try:
            shape = preset_shape(preset)
        except TopologyError as error:
            field = f"metadata.labels[{api.LABEL_TOPOLOGY_PRESET}]"
            raise ObjectError("node", name, field, str(error)) from error
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    cpu = quantity(allocatable.get("cpu", "0"), "status.allocatable.cpu", name)
    memory = quantity(allocatable.get("memory", "0"), "status.allocatable.memory", name)
    return NodeInfo(name, shape, int(cpu * 1000), int(memory / 2**20), labels=dict(labels))


def topology_shape(obj: dict[str, Any]) -> NodeShape:
    """The compiled shape of a GPUTopology object's spec (the preset schema). Nodes of one
    model publish identical specs, so shapes are shared through a cache keyed by the spec."""
    name = (obj.get("metadata") or {}).get("name", "?")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ObjectError("gputopology", name, "spec", "missing")
    key = orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
    try:
        return _shape_of_spec(key)
    except TopologyError as error:
        raise ObjectError("gputopology", name, "spec", str(error)) from error


@lru_cache(maxsize=256)
def _shape_of_spec(key: bytes) -> NodeShape:
    spec = orjson.loads(key)
    return compile_shape(build_topology(spec, source=f"GPUTopology spec {spec.get('name', '')}"))


@dataclass(frozen=True)
class ReservationRecord:
    """A preemptor's plan, kept in its ``tidal.dev/reservation`` pod condition (JSON message)."""

    node: str
    gpus: tuple[int, ...]
    victims: tuple[str, ...]
    expires_at: float

    def to_message(self) -> str:
        expires = dt.datetime.fromtimestamp(self.expires_at, dt.UTC).isoformat()
        return json.dumps(
            {
                "node": self.node,
                "gpus": list(self.gpus),
                "victims": list(self.victims),
                "expiresAt": expires.replace("+00:00", "Z"),
            },
            separators=(",", ":"),
        )

    def reservation(self, preemptor_uid: str) -> Reservation:
        return Reservation(
            preemptor_uid, self.node, mask_of(self.gpus), frozenset(self.victims), self.expires_at
        )

    @staticmethod
    def parse(text: object, owner: str) -> ReservationRecord:
        """Checks every field (types and ranges), so a record that parses is safe to apply."""
        field = f"status.conditions[{api.CONDITION_RESERVATION}].message"

        def refuse(problem: str) -> ObjectError:
            return ObjectError("pod", owner, field, f"not a reservation record: {problem}")

        try:
            data = json.loads(text) if isinstance(text, str) else None
        except ValueError as error:
            raise refuse(str(error)) from error
        if not isinstance(data, dict):
            raise refuse("expected a JSON object")
        node, gpus, victims = data.get("node"), data.get("gpus"), data.get("victims")
        if not isinstance(node, str) or not node:
            raise refuse("'node' must be a node name")
        if not isinstance(gpus, list) or not _is_index_list(gpus):
            raise refuse(f"'gpus' must be distinct GPU indices 0..{_MAX_GPUS - 1}, got {gpus!r}")
        if not isinstance(victims, list) or not all(isinstance(v, str) for v in victims):
            raise refuse("'victims' must be a list of pod UIDs")
        expires = timestamp(data.get("expiresAt"))
        if expires is None:
            raise refuse("'expiresAt' must be an RFC 3339 time")
        return ReservationRecord(node, tuple(gpus), tuple(victims), expires)


_MAX_GPUS = 64  # more GPUs than any node has; bounds the masks a record can make


def _is_index_list(value: object) -> bool:
    if not isinstance(value, list) or not value:
        return False
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return ints and all(0 <= v < _MAX_GPUS for v in value) and len(set(value)) == len(value)


def reservation_message(pod: dict[str, Any]) -> str | None:
    """The message of the pod's live ``tidal.dev/reservation`` condition, if it has one."""
    status = pod.get("status")
    conditions = status.get("conditions") if isinstance(status, dict) else None
    for condition in conditions if isinstance(conditions, list) else []:
        if (
            isinstance(condition, dict)
            and condition.get("type") == api.CONDITION_RESERVATION
            and condition.get("status") == "True"
        ):
            message = condition.get("message")
            return message if isinstance(message, str) else ""
    return None

"""Kubernetes objects (as parsed JSON) to the placement core's values, with field-named errors.

Annotations read here (prefix ``tidal.dev/``): ``gpus`` (GPU indices written at bind),
``topology-mode`` and ``topology-tier`` (the request; default best-effort at nvlink),
``reservation`` (a preemptor's plan, JSON), ``checkpoint-interval-seconds`` (lost-work model).
Node topology comes from the node agent's GPUTopology object (named after the node), else from
the node label ``tidal.dev/topology-preset``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

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

GPU_RESOURCE = "nvidia.com/gpu"
PREFIX = "tidal.dev/"
GPUS = PREFIX + "gpus"
TOPOLOGY_MODE = PREFIX + "topology-mode"
TOPOLOGY_TIER = PREFIX + "topology-tier"
RESERVATION = PREFIX + "reservation"
# The tier the bound GPU set achieved (tightest domain holding it), for the operator's status.
ACHIEVED_TIER = PREFIX + "topology-achieved"
CHECKPOINT_INTERVAL = PREFIX + "checkpoint-interval-seconds"
PRESET_LABEL = PREFIX + "topology-preset"
# kube's system-node-critical / system-cluster-critical start here; never victims of tidal.
SYSTEM_PRIORITY = 1_000_000_000

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
    for i, container in enumerate(containers):
        resources = container.get("resources") or {}
        # Extended resources must have requests == limits; kube defaults requests from limits.
        merged = {**(resources.get("limits") or {}), **(resources.get(key) or {})}
        for name, value in merged.items():
            field = f"spec.containers[{i}].resources.{key}.{name}"
            totals[name] = totals.get(name, 0.0) + quantity(value, field, owner)
    return totals


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def pod_gpus(pod: dict[str, Any]) -> int:
    """Whole GPUs the pod asks for (containers summed; init containers run before, so max)."""
    spec = pod.get("spec") or {}
    owner = pod_key(pod)
    main = _resources(spec.get("containers") or [], owner, "requests").get(GPU_RESOURCE, 0.0)
    init = max(
        (
            _resources([c], owner, "requests").get(GPU_RESOURCE, 0.0)
            for c in spec.get("initContainers") or []
        ),
        default=0.0,
    )
    return int(max(main, init))


def _cpu_memory(pod: dict[str, Any]) -> tuple[int, int]:
    totals = _resources((pod.get("spec") or {}).get("containers") or [], pod_key(pod), "requests")
    return int(totals.get("cpu", 0.0) * 1000), int(totals.get("memory", 0.0) / 2**20)


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def pod_request(pod: dict[str, Any]) -> PodRequest:
    """What an unbound pod asks of the placement core."""
    meta = pod.get("metadata") or {}
    key = pod_key(pod)
    uid = meta.get("uid")
    if not uid:
        raise ObjectError("pod", key, "metadata.uid", "missing")
    gpus = pod_gpus(pod)
    if gpus < 1:
        raise ObjectError("pod", key, f"resources.{GPU_RESOURCE}", "the pod requests no GPUs")
    notes = annotations_of(pod)
    mode_text = notes.get(TOPOLOGY_MODE, TopologyMode.BEST_EFFORT.value)
    try:
        mode = TopologyMode(mode_text)
    except ValueError:
        choices = ", ".join(m.value for m in TopologyMode)
        raise ObjectError(
            "pod",
            key,
            f"metadata.annotations[{TOPOLOGY_MODE}]",
            f"{mode_text!r} is not one of {choices}",
        ) from None
    try:
        tier = Tier.parse(notes.get(TOPOLOGY_TIER, Tier.NVLINK.label))
    except (TopologyError, ValueError) as error:
        raise ObjectError(
            "pod", key, f"metadata.annotations[{TOPOLOGY_TIER}]", str(error)
        ) from None
    if tier is Tier.RACK:
        raise ObjectError(
            "pod", key, f"metadata.annotations[{TOPOLOGY_TIER}]", "'rack' applies to gangs only"
        )
    cpu, memory = _cpu_memory(pod)
    return PodRequest(
        uid=uid,
        name=key,
        gpus=gpus,
        priority=int((pod.get("spec") or {}).get("priority") or 0),
        cpu_milli=cpu,
        memory_mib=memory,
        mode=mode,
        tier=tier,
    )


def parse_gpu_list(text: str, owner: str, gpu_count: int) -> int:
    """The ``tidal.dev/gpus`` annotation ("0,1,2,3") as a mask on a node of ``gpu_count``."""
    field = f"metadata.annotations[{GPUS}]"
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ObjectError(
            "pod", owner, field, f"expected GPU indices like '0,1', got {text!r}"
        ) from None
    if any(i < 0 or i >= gpu_count for i in indices) or len(set(indices)) != len(indices):
        raise ObjectError("pod", owner, field, f"{text!r} is not a set of GPUs 0..{gpu_count - 1}")
    return mask_of(indices)


def format_gpu_list(mask: int) -> str:
    return ",".join(str(i) for i in bits(mask))


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def is_terminal(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_info(pod: dict[str, Any], gpus: int) -> PodInfo:
    """A bound pod holding ``gpus`` (a mask on its node)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    priority = int(spec.get("priority") or 0)
    cpu, memory = _cpu_memory(pod)
    controller = next(
        (ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")),
        None,
    )
    interval = annotations_of(pod).get(CHECKPOINT_INTERVAL)
    started = _timestamp(status.get("startTime")) or _timestamp(meta.get("creationTimestamp"))
    return PodInfo(
        uid=meta["uid"],
        name=pod_key(pod),
        node=spec["nodeName"],
        gpus=gpus,
        priority=priority,
        cpu_milli=cpu,
        memory_mib=memory,
        preemptible=priority < SYSTEM_PRIORITY,
        workload=controller,
        start_time=started or 0.0,
        checkpoint_interval_s=float(interval) if interval else None,
    )


def node_info(node: dict[str, Any], published: NodeShape | None = None) -> NodeInfo:
    """A Node with a known topology as the core's NodeInfo; ObjectError says what is missing.
    The topology is the node agent's GPUTopology (``published``) when there is one, else the
    preset named by the node's ``tidal.dev/topology-preset`` label (nodes without an agent)."""
    meta = node.get("metadata") or {}
    name = meta.get("name", "?")
    labels = meta.get("labels") or {}
    preset = labels.get(PRESET_LABEL)
    if published is not None:
        shape = published
    elif preset is None:
        raise ObjectError(
            "node",
            name,
            f"metadata.labels[{PRESET_LABEL}]",
            "no GPU topology known for the node (no GPUTopology object, no preset label)",
        )
    else:
        try:
            shape = preset_shape(preset)
        except TopologyError as error:
            field = f"metadata.labels[{PRESET_LABEL}]"
            raise ObjectError("node", name, field, str(error)) from None
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
        raise ObjectError("gputopology", name, "spec", str(error)) from None


@lru_cache(maxsize=256)
def _shape_of_spec(key: bytes) -> NodeShape:
    spec = orjson.loads(key)
    return compile_shape(build_topology(spec, source=f"GPUTopology spec {spec.get('name', '')}"))


@dataclass(frozen=True)
class ReservationRecord:
    """The ``tidal.dev/reservation`` annotation on a preemptor pod."""

    node: str
    gpus: tuple[int, ...]
    victims: tuple[str, ...]
    expires_at: float

    def to_annotation(self) -> str:
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
    def parse(text: str, owner: str) -> ReservationRecord:
        field = f"metadata.annotations[{RESERVATION}]"
        try:
            data = json.loads(text)
            return ReservationRecord(
                node=str(data["node"]),
                gpus=tuple(int(g) for g in data["gpus"]),
                victims=tuple(str(v) for v in data["victims"]),
                expires_at=_timestamp(str(data["expiresAt"])) or 0.0,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ObjectError("pod", owner, field, f"not a reservation record: {error}") from None

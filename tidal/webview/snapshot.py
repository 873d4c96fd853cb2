"""What the web view shows, as one snapshot of the GPU pool (version 1): every GPU of every node
with its state and holder, the reservations, recent preemptions with their victims and cost, and
the pending pods with their reasons. The extender builds one from its cache per request, the
simulator one per recorded frame of a replay; :meth:`Snapshot.to_json` is the wire form::

    {"version": 1, "source": "extender" | "simulator",
     "time": unix seconds (extender) or simulated seconds since the replay's start (simulator),
     "nodes": [{"name": str, "gpus": [{"gpu": int, "state": "free|batch|online|reserved|unhealthy",
                "class": "online|batch|other|", "tier": str,
                "mode": "guaranteed|best-effort|none|", "namespace": str, "pod": str,
                "workload": str}]}],
     "reservations": [{"preemptor": "ns/pod", "node": str, "gpus": [int]}],
     "preemptions": [{"time": float, "preemptor": "ns/pod", "class": str, "tier": str,
                      "node": str, "victims": [{"pod": "ns/pod", "class": str, "gpus": int}],
                      "victim_gpus": int, "wasted_gpus": int, "lost_gpu_seconds": float}],
     "pending": [{"pod": "ns/pod", "reason": str, "waiting_s": float}],
     "totals": {"free": int, "batch": int, "online": int, "reserved": int, "unhealthy": int}}

A GPU's state is the extender's (``tidal.scheduler_extender.pool``): unhealthy, reserved (its
holder is the preemptor), batch (PriorityClass tidal-batch), online (any other pod), free. Its
holder fields are empty when nobody holds it. Preemptions are newest first, pending pods
longest waiting first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SNAPSHOT_VERSION = 1
STATES = ("free", "batch", "online", "reserved", "unhealthy")
# How many preemptions a snapshot lists: the extender's ring buffer, and a replay's rolling list.
RECENT_PREEMPTIONS = 50

# Each colour key's colour (saturated and far apart in hue, so a screenshot tells them apart)
# and its legend text. The page takes both from here: this is the only copy of the palette.
COLOURS = {
    "free": "#22c55e",
    "batch": "#2563eb",
    "online-guaranteed": "#9333ea",
    "online-best-effort": "#ec4899",
    "other": "#06b6d4",
    "reserved": "#facc15",
    "unhealthy": "#dc2626",
}
LEGEND = {
    "free": "free",
    "batch": "batch (tidal-batch)",
    "online-guaranteed": "online, topology guaranteed",
    "online-best-effort": "online, best-effort topology",
    "other": "other PriorityClass",
    "reserved": "reserved for a preemptor",
    "unhealthy": "unhealthy",
}


def colour_key(gpu: Mapping[str, Any]) -> str:
    """The colour key of one GPU of :meth:`Snapshot.to_json` (the page's JavaScript mirrors
    this): its state, except that an online GPU is split by its holder. A pod of a PriorityClass
    that is not tidal's is ``other``; a tidal-online pod is ``online-guaranteed`` when its
    topology mode is ``guaranteed`` (``tidal.dev/topology-mode``), else ``online-best-effort``.
    An unknown state is ``other``."""
    state = gpu.get("state")
    if state != "online":
        return state if isinstance(state, str) and state in COLOURS else "other"
    if gpu.get("class") == "other":
        return "other"
    return "online-guaranteed" if gpu.get("mode") == "guaranteed" else "online-best-effort"


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU and who holds it (empty fields: nobody)."""

    index: int
    state: str
    klass: str = ""  # online | batch | other
    tier: str = ""  # the topology tier its holder asked for
    namespace: str = ""
    pod: str = ""
    workload: str = ""  # the owning LLMService / LLMBatchJob, else the pod
    mode: str = ""  # the topology mode its holder asked for: guaranteed | best-effort | none

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"GPU {self.index}: state {self.state!r} is not one of {STATES}")

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.index,
            "state": self.state,
            "class": self.klass,
            "tier": self.tier,
            "mode": self.mode,
            "namespace": self.namespace,
            "pod": self.pod,
            "workload": self.workload,
        }


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    gpus: tuple[GpuView, ...]  # by GPU index

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gpus": [gpu.to_json() for gpu in self.gpus]}


@dataclass(frozen=True, slots=True)
class ReservationView:
    preemptor: str  # ns/pod
    node: str
    gpus: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"preemptor": self.preemptor, "node": self.node, "gpus": list(self.gpus)}


@dataclass(frozen=True, slots=True)
class Victim:
    pod: str  # ns/pod
    klass: str
    gpus: int

    def to_json(self) -> dict[str, Any]:
        return {"pod": self.pod, "class": self.klass, "gpus": self.gpus}


@dataclass(frozen=True, slots=True)
class PreemptionRecord:
    """One preemption plan carried out, and what it cost."""

    time: float
    preemptor: str  # ns/pod
    klass: str  # the preemptor's class
    tier: str  # the topology tier it asked for
    node: str
    victims: tuple[Victim, ...]
    victim_gpus: int  # GPUs its victims held
    wasted_gpus: int  # GPUs freed that the preemptor does not use
    lost_gpu_seconds: float  # victims' GPUs x seconds since their last checkpoint or start

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "preemptor": self.preemptor,
            "class": self.klass,
            "tier": self.tier,
            "node": self.node,
            "victims": [victim.to_json() for victim in self.victims],
            "victim_gpus": self.victim_gpus,
            "wasted_gpus": self.wasted_gpus,
            "lost_gpu_seconds": self.lost_gpu_seconds,
        }


@dataclass(frozen=True, slots=True)
class PendingPod:
    pod: str  # ns/pod
    reason: str
    waiting_s: float

    def to_json(self) -> dict[str, Any]:
        return {"pod": self.pod, "reason": self.reason, "waiting_s": self.waiting_s}


@dataclass(frozen=True)
class Snapshot:
    source: str  # extender | simulator
    time: float
    nodes: tuple[NodeView, ...] = ()
    reservations: tuple[ReservationView, ...] = ()
    preemptions: tuple[PreemptionRecord, ...] = ()  # newest first
    pending: tuple[PendingPod, ...] = ()  # longest waiting first

    def totals(self) -> dict[str, int]:
        """GPUs per state over every node (every state, 0 included)."""
        counts = dict.fromkeys(STATES, 0)
        for node in self.nodes:
            for gpu in node.gpus:
                counts[gpu.state] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "source": self.source,
            "time": self.time,
            "nodes": [node.to_json() for node in self.nodes],
            "reservations": [reservation.to_json() for reservation in self.reservations],
            "preemptions": [preemption.to_json() for preemption in self.preemptions],
            "pending": [pending.to_json() for pending in self.pending],
            "totals": self.totals(),
        }

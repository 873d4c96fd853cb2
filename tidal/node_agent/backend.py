"""Discovery backends: the fake that serves presets and fixtures, and the choice of backend.

The NVML backend lives in :mod:`tidal.node_agent.nvml`; both satisfy
:class:`~tidal.node_agent.facts.GpuBackend` and return :class:`NodeFacts`, so the rest of the
agent (publishing, device plugin, standalone launcher) never knows which one ran.
"""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from tidal.node_agent.facts import (
    DiscoveryError,
    GpuBackend,
    GpuSample,
    NodeFacts,
    facts_from_topology,
    fake_facts,
)
from tidal.topology import TopologyError, build_topology

IDLE_TEMPERATURE_C = 35.0  # what an idle datacenter GPU reads, about
IDLE_POWER_W = 60.0


class FakeBackend:
    """Serves a preset or a fixture topology as if NVML had discovered it. Health can be flipped
    with :meth:`set_health`, or from outside through ``health_file``: one line per unhealthy
    GPU, ``INDEX REASON`` (e.g. ``3 XID 79``), read at every sample. Every GPU reads as idle:
    no utilization or memory in use, and an idle GPU's temperature and power draw, so every
    series NVML would give exists on a fake node too."""

    def __init__(self, facts: NodeFacts, health_file: Path | None = None) -> None:
        self._facts = facts
        self._lock = threading.Lock()
        self._unhealthy: dict[int, str] = {}
        self._health_file = health_file

    def facts(self) -> NodeFacts:
        return self._facts

    def set_health(self, index: int, healthy: bool, reason: str = "") -> None:
        if not 0 <= index < len(self._facts.gpus):
            raise IndexError(f"no GPU {index} on this node")
        with self._lock:
            if healthy:
                self._unhealthy.pop(index, None)
            else:
                self._unhealthy[index] = reason or "marked unhealthy"

    def sample(self) -> list[GpuSample]:
        with self._lock:
            unhealthy = dict(self._unhealthy)
        unhealthy.update(self._from_health_file())
        return [
            GpuSample(
                g.index,
                g.index not in unhealthy,
                unhealthy.get(g.index, ""),
                temperature_c=IDLE_TEMPERATURE_C,
                power_w=IDLE_POWER_W,
            )
            for g in self._facts.gpus
        ]

    def _from_health_file(self) -> dict[int, str]:
        if self._health_file is None:
            return {}
        try:
            lines = self._health_file.read_text().splitlines()
        except FileNotFoundError:
            return {}
        out: dict[int, str] = {}
        for line in lines:
            index, _, reason = line.strip().partition(" ")
            if index.isdigit() and int(index) < len(self._facts.gpus):
                out[int(index)] = reason or "marked unhealthy"
        return out

    def close(self) -> None:
        return None


def open_backend(
    node: str,
    fake: str | None = None,
    fixture: Path | None = None,
    health_file: Path | None = None,
) -> GpuBackend:
    """The fake backend for a preset name or a topology fixture file, else NVML."""
    if fake and fixture:
        raise DiscoveryError("give --fake PRESET or --fixture FILE, not both")
    if health_file and not (fake or fixture):
        raise DiscoveryError("--fake-health applies to --fake or --fixture only")
    if fake:
        try:
            return FakeBackend(fake_facts(fake, node), health_file)
        except TopologyError as error:
            raise DiscoveryError(f"--fake: {error}") from error
    if fixture:
        return FakeBackend(load_fixture(fixture, node), health_file)
    from tidal.node_agent.nvml import NvmlBackend  # noqa: PLC0415 (needs the NVIDIA driver)

    return NvmlBackend()


def load_fixture(path: Path, node: str) -> NodeFacts:
    """Facts from a topology file in the preset schema (what `discover` prints as spec)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DiscoveryError(f"--fixture {path}: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DiscoveryError(f"--fixture {path}: not valid YAML: {error}") from error
    if isinstance(data, dict) and data.get("kind") == "GPUTopology":
        data = data.get("spec")  # what `tidal node-agent discover` prints
    if not isinstance(data, dict):
        raise DiscoveryError(f"--fixture {path}: expected a topology mapping or a GPUTopology")
    try:
        topology = build_topology(data, source=str(path))
    except TopologyError as error:
        raise DiscoveryError(str(error)) from error
    return facts_from_topology(topology, node)

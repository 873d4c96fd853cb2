"""What a node agent discovers about its GPUs, and the GPUTopology spec rebuilt from it.

Backends (NVML, fake) report raw facts the way NVML and sysfs expose them: per GPU its identity
and NUMA node; per GPU pair the PCIe path class and the NVLink lanes; per NIC its PCIe path class
to each GPU. :func:`topology_spec` rebuilds the containment tree (sockets, NUMA nodes, host
bridges, PCIe switches) from the pairwise classes. That works because PCIe path classes form an
ultrametric: the GPUs within class ``c`` of each other fall into disjoint groups, and the groups
of a nearer class nest inside those of a farther one.

The backend interface (:class:`GpuBackend`) and what it samples for health and metrics
(:class:`GpuSample`) live here too, so the backends, the publisher, the metrics and the device
plugin share these types without importing one another.

Pure: no NVML, no Kubernetes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tidal.topology import NodeTopology, PcieLevel, RackDomain, Tier, compile_shape
from tidal.topology.presets import load_preset, preset_names, preset_shape


class DiscoveryError(RuntimeError):
    """Discovery failed or returned facts that do not describe a node; the message says which."""


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str
    numa_node: int  # -1 where the platform reports none
    minor: int  # /dev/nvidia<minor>
    behind_switch: bool = True  # False: the GPU sits directly on a root port


@dataclass(frozen=True)
class NicDevice:
    name: str
    numa_node: int
    pcie: tuple[PcieLevel, ...]  # path class to each GPU, by GPU index


@dataclass(frozen=True)
class NodeFacts:
    gpus: tuple[GpuDevice, ...]
    pcie: tuple[tuple[PcieLevel, ...], ...]  # GPU x GPU path class (diagonal unused)
    nvlink: tuple[tuple[int, ...], ...]  # GPU x GPU NVLink lanes, 0 = none
    nvswitch: bool  # the NVLinks go through NVSwitches (every pair at full bandwidth)
    nics: tuple[NicDevice, ...]
    numa_cores: Mapping[int, int]  # CPU cores per NUMA node
    numa_socket: Mapping[int, int]  # socket (package) of each NUMA node
    source: str  # "nvml" or "fixture"
    driver_version: str = ""
    cuda_version: str = ""
    rack_domain: RackDomain | None = None
    preset: str | None = None  # the preset a fixture was made from

    def __post_init__(self) -> None:
        n = len(self.gpus)
        if [g.index for g in self.gpus] != list(range(n)):
            raise DiscoveryError(f"GPU indices must be 0..{n - 1} in order")
        for label, matrix in (("PCIe", self.pcie), ("NVLink", self.nvlink)):
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise DiscoveryError(f"the {label} matrix must be {n}x{n}")
            for a in range(n):
                for b in range(a):
                    if matrix[a][b] != matrix[b][a]:
                        raise DiscoveryError(f"the {label} matrix is not symmetric at {a},{b}")
        for nic in self.nics:
            if len(nic.pcie) != n:
                raise DiscoveryError(f"NIC {nic.name}: expected a path class to each of {n} GPUs")

    @property
    def gpu_model(self) -> str:
        return self.gpus[0].name if self.gpus else ""


@dataclass(frozen=True)
class GpuSample:
    """One GPU's state at one moment, for health and metrics."""

    index: int
    healthy: bool
    reason: str = ""  # why it is unhealthy, e.g. "XID 79 (GPU has fallen off the bus)"
    utilization: float = 0.0  # 0..1, share of the last sample period a kernel ran
    memory_used_mib: int = 0
    temperature_c: float | None = None
    power_w: float | None = None


class GpuBackend(Protocol):
    """What the agent needs from a discovery backend (NVML, or the fake that serves presets)."""

    def facts(self) -> NodeFacts: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


# -- facts from a known topology (the fake backend) ------------------------------------------


def facts_from_topology(topology: NodeTopology, node: str, preset: str | None = None) -> NodeFacts:
    """The facts NVML and sysfs would report on a machine built like ``topology``. UUIDs are
    stable per (node, index), so a restarted fake agent reports the same devices."""
    n = topology.gpu_count
    gpus = tuple(
        GpuDevice(
            index=i,
            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node}.gpu{i}.tidal.dev')}",
            name=topology.gpu_model,
            memory_mib=topology.gpu_memory_mib,
            pci_bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
            numa_node=int(topology.enclosing(i, "numa")[0][1]),
            minor=i,
            behind_switch=topology.graph.nodes[("gpu", i)]["parent"][0] == "switch",
        )
        for i in range(n)
    )
    numa_socket = {
        int(numa[1]): int(topology.graph.nodes[numa]["parent"][1])
        for numa in topology.containers("numa")
    }
    nics = tuple(
        NicDevice(
            name=str(nic[1]),
            numa_node=next(int(v[1]) for v in topology.ancestors(nic) if v[0] == "numa"),
            pcie=tuple(topology.pcie_path(nic, ("gpu", g)) for g in range(n)),
        )
        for nic in topology.containers("nic")
    )
    lanes = [[topology.nvlink_lanes(a, b) for b in range(n)] for a in range(n)]
    return NodeFacts(
        gpus=gpus,
        pcie=tuple(
            tuple(PcieLevel.PIX if a == b else topology.pcie_level(a, b) for b in range(n))
            for a in range(n)
        ),
        nvlink=tuple(tuple(row) for row in lanes),
        nvswitch=_all_pairs_linked(lanes) and n > 2,
        nics=nics,
        numa_cores=topology.cpu_cores(),
        numa_socket=numa_socket,
        source="fixture",
        driver_version="fake",
        rack_domain=topology.rack_domain,
        preset=preset,
    )


def _all_pairs_linked(lanes: Sequence[Sequence[int]]) -> bool:
    n = len(lanes)
    return all(lanes[a][b] for a in range(n) for b in range(n) if a != b)


# -- the preset-schema spec rebuilt from facts ------------------------------------------------


def topology_spec(facts: NodeFacts, name: str) -> dict[str, Any]:
    """The GPUTopology ``spec`` (the preset schema of tidal.topology) that ``facts`` describe."""
    if not facts.gpus:
        raise DiscoveryError("no GPUs found")
    builder = _TreeBuilder(facts)
    spec: dict[str, Any] = {
        "name": name,
        "description": f"{len(facts.gpus)}x {facts.gpu_model}, discovered from {facts.source}",
        "gpu": {"model": facts.gpu_model, "memory_mib": min(g.memory_mib for g in facts.gpus)},
        "sockets": builder.sockets(),
    }
    nvlink = _nvlink_spec(facts)
    if nvlink:
        spec["nvlink"] = nvlink
    if facts.rack_domain:
        spec["rack_domain"] = {"name": facts.rack_domain.name, "nodes": facts.rack_domain.nodes}
    return spec


def _nvlink_spec(facts: NodeFacts) -> dict[str, Any] | None:
    n = len(facts.gpus)
    pairs = [(a, b, facts.nvlink[a][b]) for a in range(n) for b in range(a + 1, n)]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None
    if facts.nvswitch:
        return {"nvswitch": True, "lanes": min(p[2] for p in pairs)}
    return {"links": [list(p) for p in pairs]}


def _groups(members: Sequence[int], together: Callable[[int, int], bool]) -> list[list[int]]:
    """Split ``members`` into groups where ``together`` holds against each group's first member
    (exact for an ultrametric), ordered by lowest member."""
    groups: list[list[int]] = []
    for member in sorted(members):
        home = next((g for g in groups if together(g[0], member)), None)
        if home is None:
            groups.append([member])
        else:
            home.append(member)
    return groups


class _TreeBuilder:
    def __init__(self, facts: NodeFacts) -> None:
        self.facts = facts
        self.next_bridge = 0
        self.next_switch = 0
        self.numa_of = self._numa_assignment()
        self.bridges_by_numa: dict[int, list[dict[str, Any]]] = {}
        self.containers: list[tuple[str, frozenset[int], dict[str, Any]]] = []

    def level(self, a: int, b: int) -> PcieLevel:
        return self.facts.pcie[a][b]

    def _numa_assignment(self) -> dict[int, int]:
        """Each GPU's NUMA node; where the platform reports none, GPUs that reach each other
        without crossing the SMP interconnect share one."""
        gpus = self.facts.gpus
        if all(g.numa_node >= 0 for g in gpus):
            return {g.index: g.numa_node for g in gpus}
        groups = _groups([g.index for g in gpus], lambda a, b: self.level(a, b) <= PcieLevel.NODE)
        return {gpu: i for i, group in enumerate(groups) for gpu in group}

    def sockets(self) -> list[dict[str, Any]]:
        numas = sorted(set(self.facts.numa_cores) | set(self.numa_of.values()))
        by_socket: dict[int, list[int]] = {}
        for numa in numas:
            by_socket.setdefault(self.facts.numa_socket.get(numa, numa), []).append(numa)
        for numa in numas:
            gpus = [g for g, n in self.numa_of.items() if n == numa]
            self.bridges_by_numa[numa] = [self._bridge(group) for group in self._by(gpus, "PHB")]
        for nic in self.facts.nics:
            self._attach_nic(nic)
        return [
            {
                "id": socket,
                "numa_nodes": [
                    {
                        "id": numa,
                        "cpu_cores": max(1, int(self.facts.numa_cores.get(numa, 1))),
                        "host_bridges": self.bridges_by_numa[numa] or [self._empty_bridge()],
                    }
                    for numa in numa_ids
                ],
            }
            for socket, numa_ids in sorted(by_socket.items())
        ]

    def _by(self, gpus: list[int], level: str) -> list[list[int]]:
        limit = PcieLevel[level]
        return _groups(gpus, lambda a, b: self.level(a, b) <= limit)

    def _empty_bridge(self) -> dict[str, Any]:
        bridge = {"id": self.next_bridge, "switches": []}
        self.next_bridge += 1
        return bridge

    def _bridge(self, gpus: list[int]) -> dict[str, Any]:
        bridge = self._empty_bridge()
        for group in self._by(gpus, "PXB"):
            inner = self._by(group, "PIX")
            lone = len(group) == 1 and not self.facts.gpus[group[0]].behind_switch
            if lone:
                bridge.setdefault("gpus", []).extend(group)
            elif len(inner) == 1:
                bridge["switches"].append(self._switch(group))
            else:
                outer = self._switch([])
                outer["switches"] = [self._switch(g) for g in inner]
                self.containers.append(("switch", frozenset(group), outer))
                bridge["switches"].append(outer)
        self.containers.append(("host_bridge", frozenset(gpus), bridge))
        return bridge

    def _switch(self, gpus: list[int]) -> dict[str, Any]:
        switch: dict[str, Any] = {"id": self.next_switch}
        self.next_switch += 1
        if gpus:
            switch["gpus"] = gpus
            self.containers.append(("switch", frozenset(gpus), switch))
        return switch

    def _attach_nic(self, nic: NicDevice) -> None:
        """A NIC goes into the smallest switch or host bridge holding every GPU at its nearest
        path class; a NIC no GPU reaches within a host bridge goes on a bridge of its own."""
        nearest = min(nic.pcie, default=PcieLevel.SYS)
        near = frozenset(g for g, level in enumerate(nic.pcie) if level == nearest)
        if nearest <= PcieLevel.PHB:
            kinds = ("switch",) if nearest <= PcieLevel.PXB else ("host_bridge",)
            fits = [c for c in self.containers if c[0] in kinds and near <= c[1]]
            if fits:
                min(fits, key=lambda c: len(c[1]))[2].setdefault("nics", []).append(nic.name)
                return
        numa = nic.numa_node if nic.numa_node in self.bridges_by_numa else min(self.bridges_by_numa)
        bridge = self._empty_bridge()
        bridge["nics"] = [nic.name]
        self.bridges_by_numa[numa].append(bridge)


# -- matching a discovered topology against the bundled presets -------------------------------


def matching_preset(topology: NodeTopology) -> str | None:
    """The bundled preset with the same GPUs, links and domains, if any (CPU core counts and
    NIC names may differ: those vary between machines of one model)."""
    shape = compile_shape(topology)
    for name in preset_names():
        other = preset_shape(name)
        if (
            other.gpu_model == shape.gpu_model
            and other.link_names == shape.link_names
            and dict(other.domains) == dict(shape.domains)
            and other.rack_domain == shape.rack_domain
        ):
            return name
    return None


def topology_class(topology: NodeTopology) -> str:
    """A one-word class for node labels: nvlink-rack, nvswitch, nvlink, or pcie."""
    if topology.rack_domain:
        return "nvlink-rack"
    shape = compile_shape(topology)
    if len(shape.domains[Tier.NVLINK]) == 1 and topology.gpu_count > 1:
        return "nvswitch" if topology.gpu_count > 2 else "nvlink"
    if any(d.bit_count() > 1 for d in shape.domains[Tier.NVLINK]):
        return "nvlink"
    return "pcie"


def fake_facts(preset: str, node: str) -> NodeFacts:
    return facts_from_topology(load_preset(preset), node, preset=preset)


def render_matrix(facts: NodeFacts) -> str:
    """The GPU/NIC link matrix in the layout of ``nvidia-smi topo -m``."""
    n = len(facts.gpus)
    names = [f"GPU{i}" for i in range(n)] + [f"NIC{i}" for i in range(len(facts.nics))]

    def cell(a: int, b: int) -> str:
        if a == b:
            return "X"
        if a < n and b < n:
            lanes = facts.nvlink[a][b]
            return f"NV{lanes}" if lanes else facts.pcie[a][b].name
        nic, gpu = (facts.nics[a - n], b) if a >= n else (facts.nics[b - n], a)
        return nic.pcie[gpu].name if gpu < n else "SYS"

    rows = [["", *names, "NUMA Affinity"]]
    for a, name in enumerate(names):
        numa = facts.gpus[a].numa_node if a < n else facts.nics[a - n].numa_node
        rows.append([name, *(cell(a, b) for b in range(len(names))), str(numa)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    legend = [
        "",
        "  X    = Self",
        "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes",
        "  NODE = Connection traversing PCIe and the interconnect between PCIe host bridges"
        " within a NUMA node",
        "  PHB  = Connection traversing PCIe and a PCIe host bridge (typically the CPU)",
        "  PXB  = Connection traversing multiple PCIe bridges (without the host bridge)",
        "  PIX  = Connection traversing at most a single PCIe bridge",
        "  NV#  = Connection traversing a bonded set of # NVLinks",
    ]
    nic_legend = [f"  NIC{i}: {nic.name}" for i, nic in enumerate(facts.nics)]
    return "\n".join(
        [line.rstrip() for line in lines] + legend + (["", *nic_legend] if nic_legend else [])
    )

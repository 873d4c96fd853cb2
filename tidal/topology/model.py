"""A node's GPU hardware as a networkx graph, built from a plain description (a preset).

The graph has one vertex per component, keyed ``(kind, id)``:

- ``("socket", s)`` ⊃ ``("numa", n)`` ⊃ ``("host_bridge", h)`` ⊃ ``("switch", w)`` (switches may
  nest) ⊃ ``("gpu", i)`` and ``("nic", name)``: a containment tree, edges with ``kind="pcie"``
  (or ``"contains"`` above the PCIe root), rooted at ``("node", "")``;
- NVLink edges between GPUs with ``kind="nvlink"`` and ``lanes`` (an NVSwitch links every pair).

The GPU-GPU link class is derived from the graph the way ``nvidia-smi topo -m`` names it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

Vertex = tuple[str, str | int]
ROOT: Vertex = ("node", "")
MAX_GPUS_PER_NODE = 16


class Tier(enum.IntEnum):
    """Alignment tiers, strongest first. A GPU set is aligned at (satisfies) tier t when every
    pair of GPUs in it communicates at t or better: the weakest link decides (docs/tiers.md).
    A pair's tier is NVLink when they share an NVLink lane (directly or through an NVSwitch),
    else the smallest hardware domain holding both: a PCIe switch tree, a NUMA node, a socket,
    the node."""

    NVLINK = 0
    PCIE_SWITCH = 1
    NUMA = 2
    SOCKET = 3
    NODE = 4
    RACK = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> Tier:
        for tier in cls:
            if tier.label == text:
                return tier
        names = ", ".join(t.label for t in cls)
        raise ValueError(f"unknown topology tier {text!r}; expected one of {names}")


class PcieLevel(enum.IntEnum):
    """PCIe path classes of ``nvidia-smi topo -m``, nearest first."""

    PIX = 0  # through one PCIe switch
    PXB = 1  # through several PCIe switches, no host bridge
    PHB = 2  # through a PCIe host bridge (the CPU root complex)
    NODE = 3  # across host bridges inside one NUMA node
    SYS = 4  # across NUMA nodes / sockets (SMP interconnect)


@dataclass(frozen=True, slots=True)
class Link:
    """How two GPUs talk: NVLink lanes if any, else a PCIe level."""

    nvlink_lanes: int
    pcie: PcieLevel

    @property
    def name(self) -> str:
        return f"NV{self.nvlink_lanes}" if self.nvlink_lanes else self.pcie.name

    @property
    def weight(self) -> int:
        """Approximate P2P bandwidth in GB/s per direction: 25 per NVLink lane (NVLink 2-4),
        otherwise by PCIe path. Only the order and rough ratios matter to the scheduler."""
        if self.nvlink_lanes:
            return 25 * self.nvlink_lanes
        return _PCIE_WEIGHT[self.pcie]


_PCIE_WEIGHT = {
    PcieLevel.PIX: 24,
    PcieLevel.PXB: 20,
    PcieLevel.PHB: 14,
    PcieLevel.NODE: 10,
    PcieLevel.SYS: 6,
}


class TopologyError(ValueError):
    """A topology description is malformed; the message names the source and the field."""


@dataclass(frozen=True, slots=True)
class RackDomain:
    """A rack-level NVLink domain (e.g. GB200 NVL72) that this node shape belongs to."""

    name: str
    nodes: int


@dataclass(frozen=True)
class NodeTopology:
    """The hardware of one node shape, as a graph plus the facts that sit beside it."""

    name: str
    description: str
    gpu_model: str
    gpu_memory_mib: int
    graph: nx.Graph
    rack_domain: RackDomain | None

    @property
    def gpu_count(self) -> int:
        return sum(1 for kind, _ in self.graph.nodes if kind == "gpu")

    def gpus(self) -> range:
        return range(self.gpu_count)

    def ancestors(self, vertex: Vertex) -> list[Vertex]:
        """The containment path from ``vertex`` up to the root, ``vertex`` first."""
        path = [vertex]
        while path[-1] != ROOT:
            path.append(self.graph.nodes[path[-1]]["parent"])
        return path

    def enclosing(self, gpu: int, kind: str) -> list[Vertex]:
        """The containers of ``kind`` holding ``gpu``, innermost first."""
        return [v for v in self.ancestors(("gpu", gpu)) if v[0] == kind]

    def members(self, container: Vertex) -> frozenset[int]:
        """GPU indices inside ``container``."""
        return frozenset(int(v[1]) for v in nx.descendants(self.tree(), container) if v[0] == "gpu")

    def tree(self) -> nx.DiGraph:
        """The containment tree, directed from the root down."""
        tree = nx.DiGraph()
        for vertex, data in self.graph.nodes(data=True):
            if "parent" in data:
                tree.add_edge(data["parent"], vertex)
        return tree

    def containers(self, kind: str) -> list[Vertex]:
        return sorted((v for v in self.graph.nodes if v[0] == kind), key=str)

    def nvlink_lanes(self, a: int, b: int) -> int:
        edge = self.graph.get_edge_data(("gpu", a), ("gpu", b))
        return int(edge["lanes"]) if edge and edge["kind"] == "nvlink" else 0

    def link(self, a: int, b: int) -> Link:
        return Link(self.nvlink_lanes(a, b), self.pcie_level(a, b))

    def pcie_level(self, a: int, b: int) -> PcieLevel:
        return self.pcie_path(("gpu", a), ("gpu", b))

    def pcie_path(self, a: Vertex, b: Vertex) -> PcieLevel:
        """The PCIe path class between two devices (GPUs or NICs), as ``nvidia-smi topo -m``
        names it."""
        up_a = self.ancestors(a)[1:]
        up_b = set(self.ancestors(b)[1:])
        common = next(v for v in up_a if v in up_b)
        kind = common[0]
        if kind == "switch":
            direct = up_a[0] == common and self.graph.nodes[b]["parent"] == common
            return PcieLevel.PIX if direct else PcieLevel.PXB
        if kind == "host_bridge":
            return PcieLevel.PHB
        if kind == "numa":
            return PcieLevel.NODE
        return PcieLevel.SYS

    def cpu_cores(self) -> dict[int, int]:
        """CPU cores per NUMA node id."""
        return {int(v[1]): int(self.graph.nodes[v]["cpu_cores"]) for v in self.containers("numa")}

    def nics(self) -> dict[str, frozenset[int]]:
        """Each NIC with the GPUs under its nearest PCIe switch or host bridge."""
        return {
            str(v[1]): self.members(self.graph.nodes[v]["parent"]) for v in self.containers("nic")
        }


def build_topology(spec: Mapping[str, Any], source: str) -> NodeTopology:
    """Build a :class:`NodeTopology` from a preset mapping; ``source`` names it in errors."""
    reader = _SpecReader(source)
    graph = nx.Graph()
    graph.add_node(ROOT, kind="node")
    name = reader.string(spec, "name")
    for i, socket in enumerate(reader.items(spec, "sockets")):
        reader.add_socket(graph, socket, f"sockets[{i}]")
    _check_gpu_indices(graph, reader)
    _add_nvlink(graph, spec.get("nvlink"), reader)
    gpu = reader.mapping(spec, "gpu")
    return NodeTopology(
        name=name,
        description=str(spec.get("description", name)),
        gpu_model=reader.string(gpu, "model", "gpu.model"),
        gpu_memory_mib=reader.integer(gpu, "memory_mib", "gpu.memory_mib", minimum=1),
        graph=graph,
        rack_domain=_rack_domain(spec.get("rack_domain"), reader),
    )


class _SpecReader:
    """Typed field access that names the source file and field path on every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> TopologyError:
        return TopologyError(f"{self.source}: field {field!r}: {problem}")

    def mapping(
        self, spec: Mapping[str, Any], key: str, path: str | None = None
    ) -> Mapping[str, Any]:
        value = spec.get(key) if isinstance(spec, Mapping) else None
        if not isinstance(value, Mapping):
            raise self.fail(path or key, f"expected a mapping, got {type(value).__name__}")
        return value

    def items(self, spec: Mapping[str, Any], key: str, path: str | None = None) -> Sequence[Any]:
        value = spec.get(key)
        if not isinstance(value, list) or not value:
            raise self.fail(path or key, "expected a non-empty list")
        return value

    def string(self, spec: Mapping[str, Any], key: str, path: str | None = None) -> str:
        value = spec.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(path or key, "expected a non-empty string")
        return value

    def integer(
        self, spec: Mapping[str, Any], key: str, path: str | None = None, minimum: int = 0
    ) -> int:
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(path or key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def add_socket(self, graph: nx.Graph, spec: Any, path: str) -> None:
        socket = self._add(graph, ("socket", self.integer(spec, "id", f"{path}.id")), ROOT, path)
        for i, numa in enumerate(self.items(spec, "numa_nodes", f"{path}.numa_nodes")):
            self.add_numa(graph, numa, socket, f"{path}.numa_nodes[{i}]")

    def add_numa(self, graph: nx.Graph, spec: Any, parent: Vertex, path: str) -> None:
        numa = self._add(graph, ("numa", self.integer(spec, "id", f"{path}.id")), parent, path)
        graph.nodes[numa]["cpu_cores"] = self.integer(spec, "cpu_cores", f"{path}.cpu_cores", 1)
        for i, bridge in enumerate(self.items(spec, "host_bridges", f"{path}.host_bridges")):
            bridge_path = f"{path}.host_bridges[{i}]"
            vertex = ("host_bridge", self.integer(bridge, "id", f"{bridge_path}.id"))
            self._add(graph, vertex, numa, bridge_path)
            self.add_pcie_children(graph, bridge, vertex, bridge_path)

    def add_pcie_children(self, graph: nx.Graph, spec: Any, parent: Vertex, path: str) -> None:
        for i, switch in enumerate(spec.get("switches") or []):
            switch_path = f"{path}.switches[{i}]"
            vertex = ("switch", self.integer(switch, "id", f"{switch_path}.id"))
            self._add(graph, vertex, parent, switch_path)
            self.add_pcie_children(graph, switch, vertex, switch_path)
        for gpu in spec.get("gpus") or []:
            if not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0:
                raise self.fail(f"{path}.gpus", f"GPU index must be an integer >= 0, got {gpu!r}")
            self._add(graph, ("gpu", gpu), parent, f"{path}.gpus")
        for nic in spec.get("nics") or []:
            self._add(graph, ("nic", str(nic)), parent, f"{path}.nics")

    def _add(self, graph: nx.Graph, vertex: Vertex, parent: Vertex, path: str) -> Vertex:
        if vertex in graph:
            raise self.fail(path, f"duplicate {vertex[0]} {vertex[1]!r}")
        graph.add_node(vertex, kind=vertex[0], parent=parent)
        graph.add_edge(parent, vertex, kind="pcie" if parent[0] in _PCIE_KINDS else "contains")
        return vertex


_PCIE_KINDS = {"host_bridge", "switch"}


def _check_gpu_indices(graph: nx.Graph, reader: _SpecReader) -> None:
    indices = sorted(int(v[1]) for v in graph.nodes if v[0] == "gpu")
    if not indices:
        raise reader.fail("sockets", "no GPUs declared under any switch or host bridge")
    if indices != list(range(len(indices))):
        raise reader.fail("sockets", f"GPU indices must be 0..{len(indices) - 1}, got {indices}")
    if len(indices) > MAX_GPUS_PER_NODE:
        raise reader.fail(
            "sockets", f"at most {MAX_GPUS_PER_NODE} GPUs per node, got {len(indices)}"
        )


def _add_nvlink(graph: nx.Graph, spec: Any, reader: _SpecReader) -> None:
    if spec is None:
        return
    if not isinstance(spec, Mapping):
        raise reader.fail("nvlink", "expected a mapping with 'nvswitch' or 'links'")
    gpu_count = sum(1 for v in graph.nodes if v[0] == "gpu")
    for a, b, lanes in _nvlink_pairs(spec, gpu_count, reader):
        graph.add_edge(("gpu", a), ("gpu", b), kind="nvlink", lanes=lanes)


def _nvlink_pairs(
    spec: Mapping[str, Any], gpu_count: int, reader: _SpecReader
) -> Iterator[tuple[int, int, int]]:
    if spec.get("nvswitch"):
        lanes = reader.integer(spec, "lanes", "nvlink.lanes", minimum=1)
        for a in range(gpu_count):
            for b in range(a + 1, gpu_count):
                yield a, b, lanes
        return
    for i, link in enumerate(reader.items(spec, "links", "nvlink.links")):
        field = f"nvlink.links[{i}]"
        if not (
            isinstance(link, list) and len(link) == 3 and all(isinstance(x, int) for x in link)
        ):
            raise reader.fail(field, f"expected [gpu_a, gpu_b, lanes], got {link!r}")
        a, b, lanes = link
        if not (0 <= a < gpu_count and 0 <= b < gpu_count and a != b and lanes > 0):
            raise reader.fail(field, f"GPUs must be two distinct indices < {gpu_count}, lanes > 0")
        yield a, b, lanes


def _rack_domain(spec: Any, reader: _SpecReader) -> RackDomain | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise reader.fail("rack_domain", "expected a mapping with 'name' and 'nodes'")
    return RackDomain(
        name=reader.string(spec, "name", "rack_domain.name"),
        nodes=reader.integer(spec, "nodes", "rack_domain.nodes", minimum=1),
    )

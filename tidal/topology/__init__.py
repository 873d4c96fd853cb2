"""tidal.topology: a node's GPU hardware as a graph, its presets, and compiled node shapes.

Pure: no I/O beyond reading the bundled preset files, no other tidal package.
"""

from tidal.topology.model import (
    Link,
    NodeTopology,
    PcieLevel,
    RackDomain,
    Tier,
    TopologyError,
    build_topology,
)
from tidal.topology.presets import load_preset, parse_topology, preset_names, preset_shape
from tidal.topology.shape import NODE_TIERS, NodeShape, bits, compile_shape, mask_of

__all__ = [
    "NODE_TIERS",
    "Link",
    "NodeShape",
    "NodeTopology",
    "PcieLevel",
    "RackDomain",
    "Tier",
    "TopologyError",
    "bits",
    "build_topology",
    "compile_shape",
    "load_preset",
    "mask_of",
    "parse_topology",
    "preset_names",
    "preset_shape",
]

"""Tier semantics (docs/tiers.md): weakest link. A GPU set satisfies tier t when every pair in
it communicates at t or better; a pair's tier is NVLink when the two share an NVLink lane, else
the smallest hardware domain holding both (PCIe switch tree, NUMA node, socket, node)."""

from __future__ import annotations

import itertools

import pytest

from tidal.placement import ClusterSnapshot, NodeInfo, PodRequest, TopologyMode, filter_nodes
from tidal.topology import NODE_TIERS, PcieLevel, Tier, bits, load_preset, mask_of, preset_names
from tidal.topology import preset_shape as shape_of


def _pair_tier_from_links(name: str, a: int, b: int) -> Tier:
    """The reference, read off the `nvidia-smi topo -m` link class and the socket tree."""
    topology = load_preset(name)
    link = topology.link(a, b)
    if link.nvlink_lanes:
        return Tier.NVLINK
    if link.pcie in (PcieLevel.PIX, PcieLevel.PXB):
        return Tier.PCIE_SWITCH
    if link.pcie in (PcieLevel.PHB, PcieLevel.NODE):
        return Tier.NUMA
    same_socket = topology.enclosing(a, "socket") == topology.enclosing(b, "socket")
    return Tier.SOCKET if same_socket else Tier.NODE


@pytest.mark.parametrize("name", preset_names())
def test_every_set_achieves_the_tier_of_its_weakest_pair(name: str) -> None:
    shape = shape_of(name)
    for size in range(1, shape.gpu_count + 1):
        for combo in itertools.combinations(range(shape.gpu_count), size):
            mask = mask_of(combo)
            pairs = [_pair_tier_from_links(name, a, b) for a, b in itertools.combinations(combo, 2)]
            weakest = max(pairs, default=Tier.NVLINK)
            assert shape.tier_of(mask) is weakest, (combo, shape.tier_of(mask))
            for tier in NODE_TIERS:
                assert shape.is_aligned(mask, tier) == (weakest <= tier), (combo, tier)
                assert shape.shortfall(mask, tier) == max(0, weakest - tier)
            assert shape.is_aligned(mask, Tier.RACK)


# One row per preset: sets a tensor-parallel group could get, and the tier each achieves.
TABLE = {
    "hgx-a100": [
        ([0, 1], Tier.NVLINK),
        ([0, 2], Tier.NVLINK),  # two NUMA nodes, but NVSwitch: satisfies numa, socket, node
        ([0, 1, 2, 3], Tier.NVLINK),
        ([0, 1, 4, 5], Tier.NVLINK),  # spans sockets, every pair NV12
        (list(range(8)), Tier.NVLINK),
    ],
    "dgx-h100": [([0, 4], Tier.NVLINK), ([0, 1, 4, 5], Tier.NVLINK), (list(range(8)), Tier.NVLINK)],
    "gb200-nvl72": [([0, 2], Tier.NVLINK), ([0, 1, 2, 3], Tier.NVLINK)],
    "dgx1-v100": [
        ([0, 1, 2, 3], Tier.NVLINK),  # a quad: fully connected
        ([0, 4], Tier.NVLINK),  # the cross-quad lane: NVLink across sockets
        ([0, 5], Tier.NODE),  # no lane, different sockets: SYS
        ([0, 1, 4], Tier.NODE),  # 1-4 has no lane and crosses sockets
        ([0, 1, 2, 3, 4, 5, 6, 7], Tier.NODE),
        ([0, 3, 1, 2], Tier.NVLINK),
    ],
    "a100-pcie-nvlink-pairs": [([0, 1], Tier.NVLINK), ([0, 2], Tier.NODE), ([0, 1, 2], Tier.NODE)],
    "pcie-8x-l40s": [
        ([0, 1], Tier.PCIE_SWITCH),
        ([0, 2], Tier.NUMA),  # two root ports of one NUMA node
        ([0, 1, 2, 3], Tier.NUMA),
        ([0, 4], Tier.NODE),
    ],
    "rtx4090-8x": [
        ([0, 1], Tier.PCIE_SWITCH),
        ([0, 1, 2, 3], Tier.PCIE_SWITCH),  # one cascaded switch tree (PXB)
        ([0, 4], Tier.NODE),
    ],
    "pcie-2x": [([0, 1], Tier.PCIE_SWITCH)],
    "single-gpu": [([0], Tier.NVLINK)],
}


def test_the_table_covers_every_preset() -> None:
    assert set(TABLE) == set(preset_names())


@pytest.mark.parametrize(
    ("name", "gpus", "tier"), [(n, g, t) for n, rows in TABLE.items() for g, t in rows]
)
def test_tier_table(name: str, gpus: list[int], tier: Tier) -> None:
    assert shape_of(name).tier_of(mask_of(gpus)) is tier


@pytest.mark.parametrize("name", preset_names())
def test_guaranteed_placement_follows_the_same_rule(name: str) -> None:
    """The core's filter (which the extender and the simulator call) admits a guaranteed
    request on a node exactly when some free set satisfies the tier by weakest link."""
    shape = shape_of(name)
    for size, tier in itertools.product(range(1, shape.gpu_count + 1), NODE_TIERS):
        snapshot = ClusterSnapshot([NodeInfo("n", shape, 10**6, 10**6)])
        request = PodRequest("p", "p", size, 1000, mode=TopologyMode.GUARANTEED, tier=tier)
        result = filter_nodes(snapshot, request)
        expected = any(
            shape.tier_of(mask_of(c)) <= tier
            for c in itertools.combinations(bits(shape.full_mask), size)
        )
        assert ("n" in result.feasible) == expected, (size, tier)
        if expected:
            assert shape.tier_of(result.placement("n").gpus) <= tier

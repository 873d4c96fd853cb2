from __future__ import annotations

import itertools

import pytest

from tidal.topology import (
    NODE_TIERS,
    Tier,
    TopologyError,
    bits,
    compile_shape,
    load_preset,
    mask_of,
    parse_topology,
    preset_names,
)

REQUIRED_PRESETS = {
    "dgx-h100",
    "hgx-a100",
    "pcie-8x-l40s",
    "a100-pcie-nvlink-pairs",
    "rtx4090-8x",
    "dgx1-v100",
    "gb200-nvl72",
}


def test_every_required_preset_is_bundled() -> None:
    assert set(preset_names()) >= REQUIRED_PRESETS


@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_presets_compile_with_consistent_domains(name: str) -> None:
    shape = compile_shape(load_preset(name))
    full = shape.full_mask
    # every GPU is in exactly one domain of each hierarchical tier
    for tier in (Tier.NUMA, Tier.SOCKET, Tier.NODE):
        covered = [d for d in shape.domains[tier]]
        assert sum(d.bit_count() for d in covered) == shape.gpu_count
        union = 0
        for d in covered:
            union |= d
        assert union == full
    # single GPUs are aligned at every tier
    for gpu in range(shape.gpu_count):
        assert shape.tier_of(1 << gpu) is Tier.NVLINK


def test_dgx1_cube_mesh_link_matrix_matches_nvidia_smi() -> None:
    shape = compile_shape(load_preset("dgx1-v100"))
    # Row GPU0 of `nvidia-smi topo -m` on a DGX-1V.
    assert shape.link_names[0] == ("X", "NV1", "NV1", "NV2", "NV2", "SYS", "SYS", "SYS")
    # Only the two quads are 4-GPU NVLink cliques; 16 NVLink-connected pairs in all.
    assert set(shape.aligned_sets(4, Tier.NVLINK)) == {0b1111, 0b11110000}
    assert len(shape.aligned_sets(2, Tier.NVLINK)) == 16
    # {0,4} (NV2) has a stronger bottleneck than {0,1} (NV1): the uneven mesh is visible.
    assert shape.bottleneck[mask_of([0, 4])] > shape.bottleneck[mask_of([0, 1])]


def test_pcie_levels_follow_the_switch_tree() -> None:
    rtx = compile_shape(load_preset("rtx4090-8x"))
    assert rtx.link_names[0][1:5] == ("PIX", "PXB", "PXB", "SYS")
    l40s = compile_shape(load_preset("pcie-8x-l40s"))
    assert l40s.link_names[0][1:5] == ("PIX", "NODE", "NODE", "SYS")


def test_nvswitch_node_is_one_clique_and_its_sets_satisfy_numa_by_weakest_link() -> None:
    h100 = compile_shape(load_preset("dgx-h100"))
    assert h100.domains[Tier.NVLINK] == (0xFF,)
    straddling = mask_of([0, 1, 4, 5])
    assert h100.is_aligned(straddling, Tier.NVLINK)
    # Every pair talks over NVSwitch, so the set satisfies numa (docs/tiers.md) though its GPUs
    # sit in two NUMA nodes: the weakest link decides, not containment.
    assert h100.is_aligned(straddling, Tier.NUMA)
    assert h100.shortfall(straddling, Tier.NUMA) == 0
    # Without NVLink, containment and weakest link agree: across sockets is two steps short.
    l40s = compile_shape(load_preset("pcie-8x-l40s"))
    assert l40s.shortfall(mask_of([0, 1, 4, 5]), Tier.NUMA) == 2


def test_gb200_node_knows_its_rack_domain() -> None:
    topo = load_preset("gb200-nvl72")
    assert topo.rack_domain is not None
    assert (topo.rack_domain.name, topo.rack_domain.nodes) == ("nvl72", 18)
    assert compile_shape(topo).gpu_count == 4


@pytest.mark.parametrize("name", ["dgx1-v100", "pcie-8x-l40s", "a100-pcie-nvlink-pairs"])
def test_has_aligned_table_equals_enumeration(name: str) -> None:
    shape = compile_shape(load_preset(name))
    for size, tier in itertools.product(range(1, shape.gpu_count + 1), NODE_TIERS):
        table = shape.has_aligned(size, tier)
        for free in range(1 << shape.gpu_count):
            expected = any(
                shape.is_aligned(mask_of(c), tier) for c in itertools.combinations(bits(free), size)
            )
            assert bool(table[free]) == expected, (size, tier, bin(free))


def test_quality_is_the_sum_of_pair_weights() -> None:
    shape = compile_shape(load_preset("dgx1-v100"))
    for mask in (0b1111, 0b10001, 0b11110000, 0b10110010):
        pairs = list(itertools.combinations(bits(mask), 2))
        assert shape.quality[mask] == sum(shape.pair_weight[a][b] for a, b in pairs)
        assert shape.bottleneck[mask] == min(shape.pair_weight[a][b] for a, b in pairs)


GOOD = """
name: tiny
gpu: {model: g, memory_mib: 10}
sockets:
  - id: 0
    numa_nodes:
      - {id: 0, cpu_cores: 4, host_bridges: [{id: 0, switches: [{id: 0, gpus: [0, 1]}]}]}
"""


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (GOOD.replace("cpu_cores: 4", "cpu_cores: -1"), "sockets[0].numa_nodes[0].cpu_cores"),
        (GOOD.replace("gpus: [0, 1]", "gpus: [0, 2]"), "sockets"),
        (GOOD.replace("memory_mib: 10", "memory_mib: x"), "gpu.memory_mib"),
        (GOOD + "nvlink: {links: [[0, 5, 1]]}\n", "nvlink.links[0]"),
        (GOOD + "nvlink: {nvswitch: true}\n", "nvlink.lanes"),
        (GOOD.replace("name: tiny", "name: ''"), "name"),
    ],
)
def test_malformed_topology_names_source_and_field(broken: str, field: str) -> None:
    with pytest.raises(TopologyError) as err:
        parse_topology(broken, "my-node.yaml")
    assert str(err.value).startswith(f"my-node.yaml: field '{field}':")


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(TopologyError, match="known: a100-pcie-nvlink-pairs"):
        load_preset("dgx-z900")

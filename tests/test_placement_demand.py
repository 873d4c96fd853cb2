"""Demand-aware fragmentation (tidal.placement.demand) and how placement ranks with it."""

from __future__ import annotations

import itertools

from tests.conftest import node, pod, snapshot
from tidal.placement import PodRequest, TopologyMode, best_placement
from tidal.placement.demand import (
    Demand,
    demand_class,
    fragmentation,
    fragmentation_delta,
    unusable_table,
)
from tidal.topology import Tier, bits, mask_of, preset_shape

BATCH = 10
ONE = PodRequest("one", "one", 1, BATCH, mode=TopologyMode.NONE, tier=Tier.NODE)


def test_unusable_for_a_count_class_is_all_free_gpus_below_its_size() -> None:
    shape = preset_shape("hgx-a100")
    table = unusable_table(shape, (8, TopologyMode.NONE, Tier.NODE))
    assert table[shape.full_mask] == 0
    assert table[0b0111_1111] == 7
    assert unusable_table(shape, (2, TopologyMode.NONE, Tier.NODE))[0b1] == 1


def test_unusable_for_an_aligned_class_is_what_no_free_aligned_set_covers() -> None:
    shape = preset_shape("pcie-8x-l40s")  # PCIe switches {0,1} {2,3} {4,5} {6,7}
    table = unusable_table(shape, (2, TopologyMode.GUARANTEED, Tier.PCIE_SWITCH))
    for free in range(1 << shape.gpu_count):
        covered = 0
        for combo in itertools.combinations(bits(free), 2):
            if shape.is_aligned(mask_of(combo), Tier.PCIE_SWITCH):
                covered |= mask_of(combo)
        assert table[free] == (free & ~covered).bit_count()
    assert table[mask_of([0, 2, 4, 6])] == 4  # four free GPUs, no free switch pair


def test_one_gpu_pod_goes_where_it_fragments_least_for_the_demand() -> None:
    # a: 7 of 8 free (one GPU short of empty); b: 2 free. Demand: 8-GPU and 2-GPU jobs.
    snap = snapshot(
        [node("a", "hgx-a100"), node("b", "hgx-a100")],
        [pod("x", "a", [0], BATCH), pod("y", "b", range(6), BATCH)],
    )
    mix = ((demand_class(ONE), 0.2), ((8, TopologyMode.NONE, Tier.NODE), 0.8))
    shape = preset_shape("hgx-a100")
    # taking one of a's seven: the 8-GPU class loses nothing more (7 -> 6 unusable: -0.8);
    # taking one of b's two: b's last GPU serves only 1-GPU pods (8-GPU class 2 -> 1: -0.8)
    assert fragmentation_delta(shape, 0b1111_1110, 0b10, mix) == -0.8
    chosen = best_placement(snap, ONE, mix)
    assert chosen is not None and chosen.node == "b"  # equal Δ: the fuller node (bin packing)
    assert fragmentation(shape, 0b1100_0000, mix) == 0.8 * 2


def test_demand_counts_each_pod_once_and_decays() -> None:
    demand = Demand(half_life=1.0, grid=0.01)
    eight = PodRequest("e", "e", 8, BATCH, mode=TopologyMode.NONE, tier=Tier.NODE)
    demand.observe(eight)
    demand.observe(eight)  # a retry of the same pod counts nothing
    assert demand.mix() == (((8, TopologyMode.NONE, Tier.NODE), 1.0),)
    demand.observe(ONE)  # 8 halves to 4, then 1 GPU: shares 0.8 / 0.2
    assert dict(demand.mix()) == {
        (1, TopologyMode.NONE, Tier.NODE): 0.2,
        (8, TopologyMode.NONE, Tier.NODE): 0.8,
    }


def test_without_a_demand_mix_bin_packing_comes_before_intact_capacity() -> None:
    # a: one GPU short of empty; b: two GPUs free, one intact PCIe pair. Ranked by intact
    # capacity first, the pod went to a (GPU 1, whose pair is already broken: nothing intact
    # lost), so a never drained for an 8-GPU job; bin packing first sends it to b.
    snap = snapshot(
        [node("a", "pcie-8x-l40s"), node("b", "pcie-8x-l40s")],
        [pod("x", "a", [0], BATCH), pod("y", "b", range(6), BATCH)],
    )
    chosen = best_placement(snap, ONE)
    assert chosen is not None and chosen.node == "b"


def test_intact_capacity_counts_the_domains_tiers_define() -> None:
    # On NVSwitch every tier's largest satisfying set is the whole node, so breaking a NUMA
    # pair costs nothing that a tier promises: only an empty node is intact capacity.
    hgx = preset_shape("hgx-a100")
    assert {hgx.tier_domains(t) for t in (Tier.NVLINK, Tier.NUMA, Tier.SOCKET)} == {(0xFF,)}
    assert hgx.tier_intact_value(0xFF) == 64 and hgx.tier_intact_value(0xFE) == 0
    # Without NVLink the tier domains are the hardware's (switch pairs, NUMA quads).
    l40s = preset_shape("pcie-8x-l40s")
    assert l40s.tier_domains(Tier.PCIE_SWITCH) == (0x03, 0x0C, 0x30, 0xC0)
    assert l40s.tier_domains(Tier.NUMA) == (0x0F, 0xF0)
    # DGX-1: the cross-quad lanes make {i, i+4} satisfy numa as well as the quads.
    dgx1 = preset_shape("dgx1-v100")
    assert set(dgx1.tier_domains(Tier.NUMA)) == {0x0F, 0xF0, 0x11, 0x22, 0x44, 0x88}

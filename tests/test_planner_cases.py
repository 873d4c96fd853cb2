"""Table-driven preemption cases; each expected result is argued in its comment."""

from __future__ import annotations

import pytest

from tests.conftest import node, pod, snapshot
from tidal.placement import (
    AnchorLike,
    ClusterSnapshot,
    Code,
    CostOrder,
    GangRequest,
    KubernetesDefault,
    NodeInfo,
    NoPlan,
    PdbInfo,
    Plan,
    PodInfo,
    PodRequest,
    Reservation,
    SubsetEnumeration,
    TopologyFirstPlanner,
    TopologyMode,
    filter_nodes,
    plan_gang,
)
from tidal.topology import Tier, bits, compile_shape, load_preset, mask_of

ONLINE = 1000
BATCH = 10
GUARANTEED_4 = PodRequest("svc", "svc-0", 4, ONLINE, mode=TopologyMode.GUARANTEED, tier=Tier.NVLINK)


def _plan(result: object) -> Plan:
    assert isinstance(result, Plan), result
    return result


def two_cliques_half_busy() -> ClusterSnapshot:
    # Cliques {0,1,2,3} and {4,5,6,7}. Batch pods: a on 0-1, b on 4-5 (2 GPUs each), c on 2,
    # d on 6 (1 GPU each); GPUs 3 and 7 are free. Two GPUs free by count, four needed.
    return snapshot(
        [node("n1", "two-quads")],
        [
            pod("a", "n1", [0, 1], BATCH, start=100),
            pod("b", "n1", [4, 5], BATCH, start=200),
            pod("c", "n1", [2], BATCH, start=300),
            pod("d", "n1", [6], BATCH, start=400),
        ],
    )


def test_b0_frees_across_cliques_ours_frees_one_clique() -> None:
    snap = two_cliques_half_busy()
    # B0 removes a, b, c, d, then reprieves by importance (a and b started earlier): a and b
    # come back (6 then 4 GPUs free by count), c and d cannot, so it evicts c and d and binds
    # first-free GPUs {2,3,6,7}: two per clique, not an NVLink clique.
    b0 = _plan(KubernetesDefault().preempt(snap, GUARANTEED_4))
    assert b0.victims == ("c", "d")
    assert bits(b0.gpus) == [2, 3, 6, 7] and b0.tier is Tier.NODE
    # Ours frees one whole clique. {0..3} costs a+c, {4..7} costs b+d: two pods each, and the
    # lost work (GPU-seconds since start, now=1000) is 2*900+700 = 2500 vs 2*800+600 = 2200.
    ours = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    assert ours.victims == ("b", "d")
    assert ours.gpus == 0b11110000 and ours.tier is Tier.NVLINK
    assert ours.cost.lost_work == 2200
    # B1 reprieves with a topology check: keeping a leaves {4..7} possible, keeping b would
    # not; c comes back, d cannot: the same clique as ours, found by priority order alone.
    assert _plan(AnchorLike().preempt(snap, GUARANTEED_4)).victims == ("b", "d")


def test_pdb_violation_outranks_victim_priority() -> None:
    # Clique {0..3} holds x (priority 10, PDB with no disruptions left); clique {4..7} holds y
    # (priority 50, no PDB). Evicting x is cheaper by priority but breaks the PDB: PDB first.
    snap = snapshot(
        [node("n1", "two-quads")],
        [pod("x", "n1", [0, 1, 2, 3], 10, pdb="x-pdb"), pod("y", "n1", [4, 5, 6, 7], 50)],
        [PdbInfo("x-pdb", 0)],
    )
    ours = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    assert ours.victims == ("y",) and ours.cost.pdb_violations == 0
    # With one disruption allowed, x is fine to evict and its lower priority wins.
    allowed = snapshot(
        list(n.info for n in snap.nodes.values()), snap.pods.values(), [PdbInfo("x-pdb", 1)]
    )
    assert _plan(TopologyFirstPlanner().plan(allowed, GUARANTEED_4)).victims == ("x",)


def test_topology_only_conflict_enough_free_none_aligned() -> None:
    # GPUs 2,3 and 6,7 are free (four by count), but each clique has two busy GPUs.
    snap = snapshot(
        [node("n1", "two-quads")],
        [
            pod("a", "n1", [0], BATCH, start=900),
            pod("b", "n1", [1], BATCH, start=800),
            pod("c", "n1", [4], BATCH, start=500),
            pod("d", "n1", [5], BATCH, start=600),
        ],
    )
    verdict = filter_nodes(snap, GUARANTEED_4)
    assert not verdict.feasible
    assert verdict.rejected["n1"].code is Code.UNSCHEDULABLE
    assert "no 4 free GPUs aligned at tier nvlink (4 free)" in verdict.rejected["n1"].reason
    # kube-scheduler's count-based view finds room without victims: that is the trap.
    assert KubernetesDefault().place(snap, GUARANTEED_4) is not None
    assert isinstance(KubernetesDefault().preempt(snap, GUARANTEED_4), NoPlan)
    # Ours evicts the two newest pods (a, b: 100 + 200 GPU-seconds lost) to free clique {0..3}.
    ours = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    assert ours.victims == ("a", "b") and ours.gpus == 0b1111 and ours.cost.waste_gpus == 0


def test_two_preemptors_contend_for_one_node() -> None:
    # n1 has a free NVLink clique's worth of batch pods in each quad; n2 is full of online pods.
    snap = snapshot(
        [node("n1", "two-quads"), node("n2", "two-quads")],
        [
            pod("a", "n1", [0, 1, 2, 3], BATCH, start=10),
            pod("b", "n1", [4, 5, 6, 7], BATCH, start=20),
            pod("on", "n2", range(8), ONLINE),
        ],
    )
    planner = TopologyFirstPlanner()
    first = _plan(planner.plan(snap, GUARANTEED_4))
    assert first.victims == ("b",)  # b started later: less lost work
    snap.reserve(Reservation("svc", first.node, first.gpus, frozenset(first.victims), 2000.0))
    # The second preemptor may not take the first one's GPUs or count its victims again.
    second_request = PodRequest("svc2", "svc-1", 4, ONLINE, mode=TopologyMode.GUARANTEED)
    second = _plan(planner.plan(snap, second_request))
    assert second.victims == ("a",) and second.gpus & first.gpus == 0
    snap.reserve(Reservation("svc2", second.node, second.gpus, frozenset(second.victims), 2000.0))
    # A third finds nothing left, and says so.
    third = planner.plan(snap, PodRequest("svc3", "svc-2", 4, ONLINE, mode=TopologyMode.GUARANTEED))
    assert isinstance(third, NoPlan) and third.code is Code.UNRESOLVABLE
    # The reserved GPUs are hidden from ordinary pods too, even once the victims are gone.
    snap.remove_pod("b")
    small = PodRequest("small", "small", 1, BATCH + 1)
    assert not filter_nodes(snap, small).feasible


def test_cube_mesh_prefers_the_fat_link() -> None:
    # DGX-1V: every GPU runs a one-GPU batch pod started at the same time, so every NVLink pair
    # costs two victims and the same lost work. Link quality breaks the tie: NV2 pairs (50 GB/s)
    # beat NV1 pairs (25 GB/s).
    snap = snapshot(
        [node("v", "dgx1-v100")], [pod(f"p{g}", "v", [g], BATCH, start=0) for g in range(8)]
    )
    request = PodRequest("r", "r", 2, ONLINE, mode=TopologyMode.GUARANTEED)
    plan = _plan(TopologyFirstPlanner().plan(snap, request))
    a, b = bits(plan.gpus)
    assert snap.nodes["v"].info.shape.link_names[a][b] == "NV2"
    # A 4-GPU guaranteed request can only take a quad; a cross-quad set is never considered.
    quad = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    assert quad.gpus in (0b1111, 0b11110000)


def test_best_effort_never_preempts_when_a_free_placement_exists() -> None:
    snap = snapshot(
        [node("n1", "two-quads")], [pod("a", "n1", [0, 1], BATCH), pod("b", "n1", [4, 5], BATCH)]
    )
    request = PodRequest("r", "r", 4, ONLINE, mode=TopologyMode.BEST_EFFORT)
    result = TopologyFirstPlanner().plan(snap, request)
    assert isinstance(result, NoPlan) and result.code is Code.SUCCESS


def test_best_effort_accepts_shortfall_when_no_clique_can_be_freed() -> None:
    # Online pods hold GPUs 0 and 4, so no NVLink clique can be freed. Guaranteed gives up;
    # best-effort evicts a and b and takes 4 GPUs across the quads: aligned only at node
    # level, a shortfall of four tier steps from nvlink.
    snap = snapshot(
        [node("n1", "two-quads")],
        [
            pod("on1", "n1", [0], ONLINE),
            pod("on2", "n1", [4], ONLINE),
            pod("a", "n1", [1, 2, 3], BATCH),
            pod("b", "n1", [5, 6, 7], BATCH),
        ],
    )
    assert isinstance(TopologyFirstPlanner().plan(snap, GUARANTEED_4), NoPlan)
    soft = PodRequest("r", "r", 4, ONLINE + 1, mode=TopologyMode.BEST_EFFORT)
    plan = _plan(TopologyFirstPlanner().plan(snap, soft))
    assert set(plan.victims) == {"a", "b"}
    assert plan.cost.topology_shortfall == Tier.NODE - Tier.NVLINK and plan.tier is Tier.NODE


def test_cpu_shortage_adds_the_cheapest_cpu_only_victim() -> None:
    # GPUs 4-7 are free but the node's CPU is taken: a CPU-only batch pod must go too.
    # Neither CPU-only pod loses GPU work; the one that started last is the cheaper extra.
    snap = snapshot(
        [node("n1", "two-quads", cpu=20_000)],
        [
            pod("g", "n1", [0, 1, 2, 3], BATCH, cpu_milli=1000),
            pod("cpu-a", "n1", [], BATCH, cpu_milli=8000, start=0),
            pod("cpu-b", "n1", [], BATCH, cpu_milli=8000, start=900),
        ],
    )
    request = PodRequest("r", "r", 4, ONLINE, cpu_milli=4000, mode=TopologyMode.GUARANTEED)
    plan = _plan(TopologyFirstPlanner().plan(snap, request))
    assert plan.victims == ("cpu-b",) and plan.gpus == 0b11110000


def test_cost_order_is_configurable() -> None:
    # {0..3}: one 4-GPU pod that ran long (lost 4*1000). {4..7}: two pods that just started.
    snap = snapshot(
        [node("n1", "two-quads")],
        [
            pod("long", "n1", [0, 1, 2, 3], BATCH, start=0),
            pod("n1a", "n1", [4, 5], BATCH, start=990),
            pod("n1b", "n1", [6, 7], BATCH, start=990),
        ],
    )
    default = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    assert default.victims == ("n1a", "n1b")  # lost work (40) before the pod count
    fewest_pods = TopologyFirstPlanner(order=CostOrder(["victim_pods"]))
    assert _plan(fewest_pods.plan(snap, GUARANTEED_4)).victims == ("long",)
    with pytest.raises(ValueError, match="unknown cost components"):
        CostOrder(["victims"])


def test_deadline_stops_the_search_and_says_so() -> None:
    nodes = [node(f"n{i}", "two-quads") for i in range(4)]
    # Equal pods everywhere: every node's lower bound ties, so each must be evaluated.
    pods = [pod(f"p{i}", f"n{i}", range(8), BATCH, start=0) for i in range(4)]
    ticks = iter(range(100))
    planner = TopologyFirstPlanner(deadline_s=1.5, clock=lambda: float(next(ticks)))
    plan = planner.plan_preemption(snapshot(nodes, pods), GUARANTEED_4)
    assert plan.deadline_hit and plan.nodes_evaluated < 4


def test_gang_in_an_nvl72_domain() -> None:
    # Two racks of three GB200 trays. Rack r1: two empty trays and one tray with a batch pod;
    # rack r2: every tray busy with batch work. A gang of three 4-GPU members fits in r1 with
    # one eviction, in r2 only with three: r1 wins, and no member lands outside it.
    nodes = [node(f"r{r}t{t}", "gb200-nvl72", domain=f"r{r}") for r in (1, 2) for t in range(3)]
    pods = [pod("r1-batch", "r1t2", range(4), BATCH)]
    pods += [pod(f"r2-batch{t}", f"r2t{t}", range(4), BATCH) for t in range(3)]
    snap = snapshot(nodes, pods)
    members = tuple(
        PodRequest(f"m{i}", f"m{i}", 4, ONLINE, mode=TopologyMode.GUARANTEED) for i in range(3)
    )
    plan = plan_gang(snap, GangRequest("tp12", members))
    assert not isinstance(plan, NoPlan)
    assert plan.domain == "r1" and plan.victims == ("r1-batch",)
    assert {a.node for a in plan.assignments} == {"r1t0", "r1t1", "r1t2"}


def test_gang_victims_are_evicted_whole() -> None:
    # A batch gang spans both nodes; evicting its member on n1 evicts its member on n2 too, so
    # the planner prefers the lone pod with more lost work over breaking the gang.
    snap = snapshot(
        [node("n1", "two-quads"), node("n2", "two-quads")],
        [
            pod("g1", "n1", [0, 1, 2, 3], BATCH, start=900, gang="job"),
            pod("g2", "n2", [0, 1, 2, 3], BATCH, start=900, gang="job"),
            pod("solo", "n1", [4, 5, 6, 7], BATCH, start=700),
            pod("on", "n2", [4, 5, 6, 7], ONLINE),
        ],
    )
    plan = _plan(TopologyFirstPlanner().plan(snap, GUARANTEED_4))
    # gang: 2 pods, 8 GPUs x 100 s = 800; solo: 4 GPUs x 300 s = 1200 -> lost work favours the
    # gang, and the plan counts both members, with the GPUs on n2 as waste.
    assert plan.victims == ("g1", "g2") and plan.cost.waste_gpus == 4


def test_b2_reports_its_cap() -> None:
    snap = snapshot([node("n1", "two-quads")], [pod(f"p{g}", "n1", [g], BATCH) for g in range(8)])
    plan = _plan(SubsetEnumeration(max_victims=4, max_candidates=6).preempt(snap, GUARANTEED_4))
    assert plan.notes and "subset cap" in plan.notes[0]
    assert plan.tier is Tier.NVLINK and len(plan.victims) == 4


def test_victims_of_a_reservation_stay_blocked_until_evicted() -> None:
    snap = snapshot([node("n1", "two-quads")], [pod("a", "n1", [0, 1, 2, 3], BATCH)])
    snap.reserve(Reservation("p1", "n1", mask_of([0, 1, 2, 3]), frozenset({"a"}), 5.0))
    other = PodRequest("p2", "p2", 4, ONLINE, mode=TopologyMode.GUARANTEED)
    assert set(filter_nodes(snap, other).feasible) == {"n1"}  # GPUs 4-7 are still free
    assert filter_nodes(snap, other).feasible["n1"].gpus == 0b11110000
    snap.now = 10.0
    assert [r.preemptor for r in snap.expire_reservations()] == ["p1"]
    assert snap.promised_to("a") is None


def test_snapshot_set_node_keeps_pods_and_remove_node_drops_them() -> None:
    shape = compile_shape(load_preset("dgx-h100"))
    snapshot = ClusterSnapshot([NodeInfo("n1", shape, 100_000, 1 << 20)])
    snapshot.add_pod(PodInfo("u1", "p1", "n1", gpus=0b11, priority=1))
    snapshot.set_node(NodeInfo("n1", shape, 50_000, 1 << 19))
    assert snapshot.nodes["n1"].info.cpu_milli == 50_000
    assert snapshot.nodes["n1"].used == 0b11
    small = compile_shape(load_preset("single-gpu"))
    with pytest.raises(ValueError, match="lost"):
        snapshot.set_node(NodeInfo("n1", small, 1, 1))
    assert [p.uid for p in snapshot.remove_node("n1")] == ["u1"]
    assert "n1" not in snapshot.nodes and "u1" not in snapshot.pods

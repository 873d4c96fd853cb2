"""Property tests on random snapshots: safety invariants for every policy, and optimality of
our planner against brute force over all victim subsets on small instances."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import node
from tidal.placement import (
    POLICY_NAMES,
    ClusterSnapshot,
    NoPlan,
    PdbInfo,
    Plan,
    PodInfo,
    PodRequest,
    Reservation,
    TopologyFirstPlanner,
    TopologyMode,
    best_placement,
    filter_nodes,
    make_policy,
)
from tidal.simulator.optimality import brute_force
from tidal.topology import NODE_TIERS, Tier, mask_of

SHAPES = ["two-quads", "dgx1-v100", "pcie-8x-l40s", "a100-pcie-nvlink-pairs", "dgx-h100"]
PRIORITIES = [0, 10, 10, 100, 100, 1000, 5000]
PREEMPTOR_PRIORITY = 1000


@st.composite
def clusters(draw: st.DrawFn, max_nodes: int = 2) -> ClusterSnapshot:
    names = [f"n{i}" for i in range(draw(st.integers(1, max_nodes)))]
    nodes = [node(n, draw(st.sampled_from(SHAPES))) for n in names]
    pods: list[PodInfo] = []
    for info in nodes:
        free = list(range(info.shape.gpu_count))
        for k in range(draw(st.integers(1, 8))):
            if not free:
                break
            size = min(draw(st.sampled_from([1, 1, 2, 4])), len(free))
            taken = draw(st.permutations(free))[:size]
            free = [g for g in free if g not in taken]
            pods.append(
                PodInfo(
                    uid=f"{info.name}-p{k}",
                    name=f"{info.name}-p{k}",
                    node=info.name,
                    gpus=mask_of(taken),
                    priority=draw(st.sampled_from(PRIORITIES)),
                    preemptible=draw(st.booleans()) or draw(st.booleans()),
                    pdb=draw(st.sampled_from([None, None, "pdb-a", "pdb-b"])),
                    workload=draw(st.sampled_from([None, "job-1", "job-2"])),
                    start_time=draw(st.integers(0, 900)),
                    last_checkpoint=draw(st.sampled_from([None, 950.0])),
                )
            )
    pdbs = [PdbInfo("pdb-a", draw(st.integers(0, 1))), PdbInfo("pdb-b", draw(st.integers(0, 2)))]
    return ClusterSnapshot(nodes, pods, pdbs, now=1000.0)


requests = st.builds(
    lambda g, mode, tier: PodRequest(
        "pre", "preemptor", g, PREEMPTOR_PRIORITY, mode=mode, tier=tier
    ),
    st.sampled_from([1, 2, 2, 4, 4, 8]),
    st.sampled_from(list(TopologyMode)),
    st.sampled_from(NODE_TIERS),
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(clusters(), requests)
def test_every_policy_plans_safely(snap: ClusterSnapshot, request: PodRequest) -> None:
    for name in POLICY_NAMES:
        result = make_policy(name).preempt(snap, request)
        if isinstance(result, NoPlan):
            continue
        victims = [snap.pods[v] for v in result.victims]
        # no priority inversion, no non-preemptible victim
        assert all(v.priority < request.priority and v.preemptible for v in victims), name
        # the plan's set is free once the victims are gone: applying it allocates no GPU twice
        after = snap.copy()
        for uid in result.victims:
            after.remove_pod(uid)
        after.add_pod(PodInfo("pre", "pre", result.node, result.gpus, request.priority))
        assert result.gpus.bit_count() == request.gpus
        if name == "tidal" and request.mode is TopologyMode.GUARANTEED:
            assert snap.nodes[result.node].info.shape.is_aligned(result.gpus, request.tier)


@SETTINGS
@given(clusters(), requests)
def test_our_victims_are_exactly_the_pods_on_the_target_set(
    snap: ClusterSnapshot, request: PodRequest
) -> None:
    result = TopologyFirstPlanner().plan(snap, request)
    if not isinstance(result, Plan):
        return
    on_target = {p.uid for p in snap.nodes[result.node].pods if p.gpus & result.gpus}
    assert set(result.victims) == on_target  # no CPU/memory requests here, so no extras


@SETTINGS
@given(clusters(), requests)
def test_planner_cost_equals_brute_force(snap: ClusterSnapshot, request: PodRequest) -> None:
    result = TopologyFirstPlanner(deadline_s=60).plan(snap, request)
    expected = brute_force(snap, request)
    if best_placement(snap, request) is not None:
        assert isinstance(result, NoPlan)
        return
    if expected is None:
        assert isinstance(result, NoPlan)
        return
    assert isinstance(result, Plan)
    event("planned")
    assert tuple(result.cost.as_dict().values()) == expected  # optimality gap 0


def test_tier_enum_round_trips() -> None:
    for tier in Tier:
        assert Tier.parse(tier.label) is tier


@SETTINGS
@given(clusters(max_nodes=5), requests, st.data())
def test_best_placement_is_the_best_feasible_node(
    snap: ClusterSnapshot, request: PodRequest, data: st.DataObject
) -> None:
    """The class-indexed scan agrees with ranking every node one by one (filter_nodes), also
    with GPUs reserved for another preemptor and pods removed since the snapshot was built."""
    for uid in data.draw(st.lists(st.sampled_from(sorted(snap.pods) or ["-"]), max_size=3)):
        if uid in snap.pods:
            snap.remove_pod(uid)
    name = data.draw(st.sampled_from(sorted(snap.nodes)))
    free = snap.free_gpus(name)
    if free and data.draw(st.booleans()):
        snap.reserve(Reservation("other", name, free & -free, frozenset(), 2000.0))
    request = dataclasses.replace(request, cpu_milli=data.draw(st.sampled_from([0, 60_000])))
    outcome = filter_nodes(snap, request)
    best = best_placement(snap, request)
    assert best == outcome.best()
    # on the nodes kube-scheduler's own filters passed, as the extender asks for it
    allowed = data.draw(st.sets(st.sampled_from(sorted(snap.nodes))))
    passed = [n for n in snap.nodes if n in allowed]
    among = filter_nodes(snap, request, passed).best()
    assert best_placement(snap, request, allowed=allowed) == among
    for name in outcome.feasible:  # the shared per-class placement, filled in per node
        assert outcome.placement(name).node == name
    classes = {n for names in snap.free_classes().values() for n in names}
    assert classes == set(snap.nodes)


@SETTINGS
@given(clusters(max_nodes=5), requests)
def test_scores_order_nodes_as_their_ranks(snap: ClusterSnapshot, request: PodRequest) -> None:
    """prioritize's scores agree with the rank filter uses: a better-ranked node never scores
    lower, equal ranks score equal, the best node scores 10 and every feasible node at least 1."""
    outcome = filter_nodes(snap, request)
    scores = outcome.scores()
    assert scores.keys() == outcome.feasible.keys()
    ranks = {name: outcome.placement(name).rank[:5] for name in outcome.feasible}
    for a, rank_a in ranks.items():
        for b, rank_b in ranks.items():
            if rank_a < rank_b:
                assert scores[a] > scores[b]  # at most 5 nodes: fewer ranks than scores
            elif rank_a == rank_b:
                assert scores[a] == scores[b]
    best = outcome.best()
    if best is not None:
        assert scores[best.node] == 10
        assert min(scores.values()) >= 1

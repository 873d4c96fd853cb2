"""M12: how far each policy's preemption plan is from the optimum, on small random instances
where brute force over every victim subset and every GPU set is affordable.

The optimum is the smallest cost key of :mod:`tidal.placement.cost` (PDB violations, highest victim
priority, topology shortfall, lost work, victims, ...); each policy's plan is costed on the same
scale with :func:`tidal.placement.plan_cost`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

from tidal.placement import (
    POLICY_NAMES,
    ClusterSnapshot,
    NodeInfo,
    NodeState,
    PdbInfo,
    Plan,
    PodInfo,
    PodRequest,
    TopologyMode,
    best_placement,
    make_policy,
    plan_cost,
)
from tidal.placement.cost import CostTuple
from tidal.topology import NODE_TIERS, bits, mask_of, preset_shape

SHAPES = ("dgx1-v100", "pcie-8x-l40s", "a100-pcie-nvlink-pairs", "dgx-h100")
PRIORITIES = (0, 10, 10, 100, 100, 1000, 5000)
PREEMPTOR_PRIORITY = 1000


def brute_force(snapshot: ClusterSnapshot, request: PodRequest) -> CostTuple | None:
    """The optimal cost key: every subset of evictable pods on every node, every GPU set of
    the preemptor's size in what that subset frees. Exponential; for small instances only."""
    best: CostTuple | None = None
    for state in snapshot.nodes.values():
        if request.gpus > state.info.shape.gpu_count:
            continue
        evictable = [p for p in state.pods if snapshot.evictable(p, request.uid, request.priority)]
        free = snapshot.free_gpus(state.name, request.uid)
        for size in range(1, len(evictable) + 1):
            for victims in itertools.combinations(evictable, size):
                freed = free
                for victim in victims:
                    freed |= victim.gpus
                for target in itertools.combinations(bits(freed), request.gpus):
                    cost = _cost(snapshot, request, state, free, victims, mask_of(target))
                    if cost is not None and (best is None or cost < best):
                        best = cost
    return best


def _cost(
    snapshot: ClusterSnapshot,
    request: PodRequest,
    state: NodeState,
    free: int,
    victims: tuple[PodInfo, ...],
    target: int,
) -> CostTuple | None:
    shape = state.info.shape
    if request.mode is TopologyMode.GUARANTEED and not shape.is_aligned(target, request.tier):
        return None
    per_pdb: dict[str, int] = {}
    freed = 0
    for victim in victims:
        freed |= victim.gpus
        if victim.pdb:
            per_pdb[victim.pdb] = per_pdb.get(victim.pdb, 0) + 1
    violations = sum(
        max(0, count - snapshot.pdbs[name].disruptions_allowed) for name, count in per_pdb.items()
    )
    shortfall = 0 if request.mode is TopologyMode.NONE else shape.shortfall(target, request.tier)
    return (
        violations,
        max(v.priority for v in victims),
        shortfall,
        sum(v.lost_work(snapshot.now) for v in victims),
        len(victims),
        len({v.workload or v.uid for v in victims}),
        sum(v.gpu_count for v in victims) - (target & state.used).bit_count(),
        -shape.tier_intact_value((free | freed) & ~target),
        -shape.quality[target],
        -shape.bottleneck[target],
    )


def random_instance(rng: random.Random, nodes: int = 2) -> tuple[ClusterSnapshot, PodRequest]:
    """A few busy nodes of real shapes with pods of mixed priority, PDBs and checkpoints, and a
    preemptor of 1 to 8 GPUs with a random topology requirement."""
    infos = [
        NodeInfo(f"n{i}", preset_shape(rng.choice(SHAPES)), 96_000, 1_000_000) for i in range(nodes)
    ]
    pods: list[PodInfo] = []
    for info in infos:
        free = list(range(info.shape.gpu_count))
        rng.shuffle(free)
        for k in range(rng.randint(1, 6)):
            size = min(rng.choice((1, 1, 2, 4)), len(free))
            if not size:
                break
            taken, free = free[:size], free[size:]
            pods.append(
                PodInfo(
                    uid=f"{info.name}-p{k}",
                    name=f"{info.name}-p{k}",
                    node=info.name,
                    gpus=mask_of(taken),
                    priority=rng.choice(PRIORITIES),
                    preemptible=rng.random() < 0.8,
                    pdb=rng.choice((None, None, "pdb-a", "pdb-b")),
                    workload=rng.choice((None, "job-1", "job-2")),
                    start_time=rng.randint(0, 900),
                    last_checkpoint=rng.choice((None, 950.0)),
                )
            )
    pdbs = [PdbInfo("pdb-a", rng.randint(0, 1)), PdbInfo("pdb-b", rng.randint(0, 2))]
    request = PodRequest(
        "pre",
        "preemptor",
        rng.choice((1, 2, 2, 4, 4, 8)),
        PREEMPTOR_PRIORITY,
        mode=rng.choice(list(TopologyMode)),
        tier=rng.choice(NODE_TIERS),
    )
    return ClusterSnapshot(infos, pods, pdbs, now=1000.0), request


@dataclass
class Gap:
    """One policy over the instances where a preemption is needed and possible."""

    policy: str
    instances: int = 0
    planned: int = 0  # instances where the policy found a plan
    optimal: int = 0  # plans whose cost key equals the optimum
    more_victims: int = 0  # plans evicting more pods than the optimum
    more_lost_work: int = 0  # plans losing more work than the optimum
    worse_alignment: int = 0  # plans with a larger topology shortfall than the optimum

    def as_dict(self) -> dict[str, Any]:
        n = self.instances or 1
        return {
            "policy": self.policy,
            "instances": self.instances,
            "planned": self.planned / n,
            "optimal": self.optimal / n,
            "more_victims": self.more_victims / n,
            "more_lost_work": self.more_lost_work / n,
            "worse_alignment": self.worse_alignment / n,
        }


def optimality_gap(instances: int = 300, seed: int = 7) -> list[dict[str, Any]]:
    """Each policy against brute force on ``instances`` random instances that need a
    preemption and have one (instances that fit without one, or have none, are skipped)."""
    rng = random.Random(seed)
    policies = [make_policy(name, deadline_s=math.inf) for name in POLICY_NAMES]
    gaps = {p.name: Gap(p.name) for p in policies}
    done = 0
    while done < instances:
        snapshot, request = random_instance(rng)
        if best_placement(snapshot, request) is not None:
            continue
        optimum = brute_force(snapshot, request)
        if optimum is None:
            continue
        done += 1
        for policy in policies:
            _score(gaps[policy.name], policy.preempt(snapshot, request), snapshot, request, optimum)
    return [gaps[p.name].as_dict() for p in policies]


def _score(
    gap: Gap, result: object, snapshot: ClusterSnapshot, request: PodRequest, optimum: CostTuple
) -> None:
    gap.instances += 1
    if not isinstance(result, Plan):
        return
    gap.planned += 1
    cost = plan_cost(snapshot, request, result.node, result.gpus, result.victims)
    values = tuple(cost.as_dict().values())
    gap.optimal += values == optimum
    gap.worse_alignment += cost.topology_shortfall > optimum[2]
    gap.more_lost_work += cost.lost_work > optimum[3] + 1e-9
    gap.more_victims += cost.victim_pods > optimum[4]

"""Node shapes: a topology compiled once into the tables the scheduling hot path reads.

GPU sets are integer bitmasks (bit i = GPU i). Every per-set fact (the tiers a set is aligned at,
its link quality and bottleneck) is a list indexed by the mask, so filter, score and the planner
do integer arithmetic and list lookups, never graph walks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx

from tidal.topology.model import NodeTopology, RackDomain, Tier

NODE_TIERS = (Tier.NVLINK, Tier.PCIE_SWITCH, Tier.NUMA, Tier.SOCKET, Tier.NODE)


def mask_of(gpus: Iterable[int]) -> int:
    mask = 0
    for gpu in gpus:
        mask |= 1 << gpu
    return mask


def bits(mask: int) -> list[int]:
    """GPU indices in ``mask``, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


@dataclass(frozen=True, eq=False)
class NodeShape:
    """A compiled node topology. Identity-compared: one object per distinct shape."""

    name: str
    gpu_count: int
    gpu_model: str
    gpu_memory_mib: int
    link_names: tuple[tuple[str, ...], ...]
    pair_weight: tuple[tuple[int, ...], ...]
    domains: Mapping[Tier, tuple[int, ...]]
    numa_cores: Mapping[int, int]
    gpu_numa: tuple[int, ...]
    rack_domain: RackDomain | None
    pair_tier: tuple[tuple[int, ...], ...]  # the tier at which two GPUs talk (docs/tiers.md)
    # Per-mask tables, index = GPU bitmask.
    aligned_tiers: list[int] = field(repr=False)
    quality: list[int] = field(repr=False)
    bottleneck: list[int] = field(repr=False)
    _lazy: dict[object, object] = field(default_factory=dict, repr=False)
    full_mask: int = field(init=False, repr=False)  # every GPU of the node

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_mask", (1 << self.gpu_count) - 1)

    def is_aligned(self, mask: int, tier: Tier) -> bool:
        return tier is Tier.RACK or bool(self.aligned_tiers[mask] >> tier & 1)

    def tier_of(self, mask: int) -> Tier:
        """The strongest tier at which ``mask`` is aligned (``NODE`` at worst): the tier of its
        weakest pair."""
        flags = self.aligned_tiers[mask]
        return Tier((flags & -flags).bit_length() - 1)

    def shortfall(self, mask: int, tier: Tier) -> int:
        """Tier steps between the requested ``tier`` and the tier ``mask`` achieves: 0 when
        aligned as requested."""
        flags = self.aligned_tiers[mask] >> tier
        return (flags & -flags).bit_length() - 1 if flags else Tier.RACK - tier

    def subsets(self, size: int) -> tuple[int, ...]:
        """All GPU sets of ``size``, best link quality first."""
        key = ("subsets", size)
        if key not in self._lazy:
            combos = (mask_of(c) for c in itertools.combinations(range(self.gpu_count), size))
            self._lazy[key] = tuple(sorted(combos, key=self._quality_order))
        return self._lazy[key]  # type: ignore[return-value]

    def aligned_sets(self, size: int, tier: Tier) -> tuple[int, ...]:
        """GPU sets of ``size`` aligned at ``tier``, best link quality first."""
        key = ("aligned", size, tier)
        if key not in self._lazy:
            self._lazy[key] = tuple(s for s in self.subsets(size) if self.is_aligned(s, tier))
        return self._lazy[key]  # type: ignore[return-value]

    def has_aligned(self, size: int, tier: Tier) -> bytearray:
        """Table over free masks: 1 where the mask contains a ``size``-set aligned at ``tier``."""
        key = ("has", size, tier)
        table = self._lazy.get(key)
        if table is None:
            table = _superset_closure(self.aligned_sets(size, tier), self.gpu_count)
            self._lazy[key] = table
        return table  # type: ignore[return-value]

    def most_free_in_aligned(self, size: int, tier: Tier) -> list[int]:
        """Table over free masks: the most free GPUs any ``size``-set aligned at ``tier`` holds,
        so ``size`` minus it is the fewest busy GPUs a preemption must free there."""
        key = ("most-free", size, tier)
        table = self._lazy.get(key)
        if table is None:
            sets = self.aligned_sets(size, tier)
            table = [
                max(((s & free).bit_count() for s in sets), default=0)
                for free in range(1 << self.gpu_count)
            ]
            self._lazy[key] = table
        return table  # type: ignore[return-value]

    def tier_intact_value(self, free: int) -> int:
        """How much aligned capacity ``free`` keeps whole: the sum of |d|² over the distinct
        tier domains d (:meth:`tier_domains`, any tier) entirely inside it. Large intact
        domains weigh most, so a placement that keeps them whole scores higher than one that
        nibbles at each. On an NVSwitch node only the whole node is a tier domain: which NUMA
        pair a pod breaks there costs nothing a tier promises. Placement, the planner, the
        simulator's M9 and the extender's pool metric all count it."""
        table = self._lazy.get("tier-intact")
        if table is None:
            table = _intact_table(self._distinct_domains(), self.gpu_count)
            self._lazy["tier-intact"] = table
        return table[free]  # type: ignore[index, no-any-return]

    def tier_domains(self, tier: Tier) -> tuple[int, ...]:
        """The largest GPU sets that satisfy ``tier`` (docs/tiers.md: every pair at ``tier`` or
        better): the maximal cliques of the graph joining GPUs whose pair tier is that good.
        Without NVLink they are the hardware domains of the tier; on an NVSwitch node every tier
        has one, the whole node."""
        key = ("tier-domains", tier)
        if key not in self._lazy:
            graph = nx.Graph()
            graph.add_nodes_from(range(self.gpu_count))
            graph.add_edges_from(
                (a, b)
                for a, b in itertools.combinations(range(self.gpu_count), 2)
                if self.pair_tier[a][b] <= tier
            )
            self._lazy[key] = tuple(sorted(mask_of(c) for c in nx.find_cliques(graph)))
        return self._lazy[key]  # type: ignore[return-value]

    def _distinct_domains(self) -> list[int]:
        return sorted({d for tier in NODE_TIERS for d in self.tier_domains(tier)})

    def _quality_order(self, mask: int) -> tuple[int, int, int]:
        return (-self.quality[mask], -self.bottleneck[mask], mask)


def compile_shape(topology: NodeTopology) -> NodeShape:
    """Compile ``topology`` into a :class:`NodeShape` (done once per distinct node shape)."""
    n = topology.gpu_count
    links = [[topology.link(a, b) for b in range(n)] for a in range(n)]
    weight = tuple(tuple(0 if a == b else links[a][b].weight for b in range(n)) for a in range(n))
    domains = _domains(topology)
    pair_tier = _pair_tiers(domains, n)
    quality, bottleneck = _pair_tables(weight, n)
    return NodeShape(
        name=topology.name,
        gpu_count=n,
        gpu_model=topology.gpu_model,
        gpu_memory_mib=topology.gpu_memory_mib,
        link_names=tuple(
            tuple("X" if a == b else links[a][b].name for b in range(n)) for a in range(n)
        ),
        pair_weight=weight,
        domains=domains,
        numa_cores=topology.cpu_cores(),
        gpu_numa=tuple(int(topology.enclosing(g, "numa")[0][1]) for g in range(n)),
        rack_domain=topology.rack_domain,
        pair_tier=pair_tier,
        aligned_tiers=_aligned_tier_table(pair_tier, n),
        quality=quality,
        bottleneck=bottleneck,
    )


def _domains(topology: NodeTopology) -> dict[Tier, tuple[int, ...]]:
    nvlink = nx.Graph()
    nvlink.add_nodes_from(topology.gpus())
    nvlink.add_edges_from(
        (a, b) for a, b in itertools.combinations(topology.gpus(), 2) if topology.nvlink_lanes(a, b)
    )
    by_kind = {Tier.PCIE_SWITCH: "switch", Tier.NUMA: "numa", Tier.SOCKET: "socket"}
    domains = {Tier.NVLINK: sorted(mask_of(c) for c in nx.find_cliques(nvlink))}
    for tier, kind in by_kind.items():
        masks = (mask_of(topology.members(v)) for v in topology.containers(kind))
        domains[tier] = sorted({m for m in masks if m})
    # A GPU outside any switch still forms a trivial PCIe domain of its own.
    lone = mask_of(topology.gpus()) & ~_union(domains[Tier.PCIE_SWITCH])
    domains[Tier.PCIE_SWITCH] = sorted(domains[Tier.PCIE_SWITCH] + [1 << g for g in bits(lone)])
    domains[Tier.NODE] = [mask_of(topology.gpus())]
    return {tier: tuple(masks) for tier, masks in domains.items()}


def _union(masks: Iterable[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _pair_tiers(domains: Mapping[Tier, tuple[int, ...]], n: int) -> tuple[tuple[int, ...], ...]:
    """The tier at which each pair of GPUs communicates: NVLink when they share a lane, else the
    smallest hardware domain holding both (one PCIe switch tree, NUMA node, socket, the node).
    A GPU with itself is NVLink (no link to cross)."""

    def tier(a: int, b: int) -> int:
        pair = (1 << a) | (1 << b)
        return next(t for t in NODE_TIERS if any(d & pair == pair for d in domains[t]))

    return tuple(tuple(Tier.NVLINK if a == b else tier(a, b) for b in range(n)) for a in range(n))


def _aligned_tier_table(pair_tier: tuple[tuple[int, ...], ...], n: int) -> list[int]:
    """For every mask, a bitfield of the tiers it satisfies: weakest link (docs/tiers.md), a set
    satisfies tier t when every pair in it communicates at t or better, so it satisfies t and
    every weaker node tier. Built by adding one GPU at a time: the achieved tier of a mask is
    the worse of its rest's and the new GPU's worst pair with the rest."""
    size = 1 << n
    achieved = [int(Tier.NVLINK)] * size
    node_flags = (1 << (Tier.NODE + 1)) - 1
    table = [0] * size
    for mask in range(1, size):
        low = (mask & -mask).bit_length() - 1
        rest = mask ^ (1 << low)
        worst = max((pair_tier[low][j] for j in bits(rest)), default=int(Tier.NVLINK))
        achieved[mask] = max(achieved[rest], worst)
        table[mask] = node_flags & ~((1 << achieved[mask]) - 1)
    table[0] = (1 << (Tier.RACK + 1)) - 1
    return table


def _submasks(mask: int) -> Iterable[int]:
    sub = mask
    while sub:
        yield sub
        sub = (sub - 1) & mask


def _pair_tables(weight: tuple[tuple[int, ...], ...], n: int) -> tuple[list[int], list[int]]:
    """Sum of pair weights and weakest pair weight for every mask, by adding one GPU at a time."""
    size = 1 << n
    quality = [0] * size
    bottleneck = [0] * size
    for mask in range(1, size):
        low = (mask & -mask).bit_length() - 1
        rest = mask ^ (1 << low)
        if not rest:
            continue
        to_rest = [weight[low][j] for j in bits(rest)]
        quality[mask] = quality[rest] + sum(to_rest)
        weakest = min(to_rest)
        bottleneck[mask] = weakest if rest & (rest - 1) == 0 else min(bottleneck[rest], weakest)
    return quality, bottleneck


def _superset_closure(sets: tuple[int, ...], n: int) -> bytearray:
    """table[m] = 1 iff m contains one of ``sets``; built by pushing flags up one bit at a time."""
    table = bytearray(1 << n)
    for s in sets:
        table[s] = 1
    for bit in range(n):
        step = 1 << bit
        for mask in range(1 << n):
            if mask & step and table[mask ^ step]:
                table[mask] = 1
    return table


def _intact_table(domains: list[int], n: int) -> list[int]:
    table = [0] * (1 << n)
    for domain in domains:
        value = domain.bit_count() ** 2
        # every superset of the domain keeps it intact
        for mask in _supersets(domain, n):
            table[mask] += value
    return table


def _supersets(mask: int, n: int) -> Iterable[int]:
    free = ((1 << n) - 1) & ~mask
    for extra in itertools.chain([0], _submasks(free)):
        yield mask | extra

"""Demand-aware fragmentation (FGD-style, Weng et al., ATC '23, on the same openb traces).

A node's free GPUs are *fragmented for* a request class (GPU count, mode, tier) when they are
free but no set of them the class could take contains them: too few free GPUs for its count,
or, for an aligned class, GPUs outside every free aligned set of its size. The node's
fragmentation is the sum over classes of the class's share of demand times its unusable free
GPUs. Placing a pod changes it by Δ: fitting a 1-GPU pod into the last free GPU of a node
lowers it for every multi-GPU class (Δ < 0), taking one GPU from an empty 8-GPU node raises it
by 7 for every 8-GPU class. Ranking by Δ weighs a domain by the demand for its size and gives
partial credit to a node one or two GPUs from empty (it still serves the smaller classes),
where counting whole intact domains gives none.

The demand is learned from the requests placement sees (:class:`Demand`): each distinct pod
counts its GPUs once, with an exponential decay, and the shares are rounded to a grid so that
the memoised tables stay valid between changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tidal.placement.request import PodRequest, TopologyMode
from tidal.topology import NodeShape, Tier

# A request class: (GPUs, mode, tier); the tier is NODE for mode NONE.
DemandClass = tuple[int, TopologyMode, Tier]
# Shares of demand per class, rounded and sorted: hashable, so it can key memo tables.
DemandMix = tuple[tuple[DemandClass, float], ...]


def demand_class(request: PodRequest) -> DemandClass:
    if request.mode is TopologyMode.NONE:
        return (request.gpus, TopologyMode.NONE, Tier.NODE)
    return (request.gpus, request.mode, request.tier)


def unusable_table(shape: NodeShape, cls: DemandClass) -> list[int]:
    """Over free masks: how many free GPUs no set the class could take covers."""
    key = ("unusable", cls)
    table = shape._lazy.get(key)
    if table is None:
        table = _unusable(shape, cls)
        shape._lazy[key] = table
    return table  # type: ignore[return-value]


def _unusable(shape: NodeShape, cls: DemandClass) -> list[int]:
    gpus, mode, tier = cls
    size = 1 << shape.gpu_count
    if gpus > shape.gpu_count:
        return [free.bit_count() for free in range(size)]
    if mode is TopologyMode.NONE:
        return [free.bit_count() if free.bit_count() < gpus else 0 for free in range(size)]
    covered = [0] * size
    rest = shape.full_mask
    for aligned in shape.aligned_sets(gpus, tier):
        others = rest & ~aligned
        sub = others
        while True:  # every free mask that contains the aligned set
            covered[aligned | sub] |= aligned
            if not sub:
                break
            sub = (sub - 1) & others
    return [(free & ~covered[free]).bit_count() for free in range(size)]


def fragmentation(shape: NodeShape, free: int, mix: DemandMix) -> float:
    """Demand-weighted free GPUs that the demand's classes cannot use (lower is better)."""
    return sum(share * unusable_table(shape, cls)[free] for cls, share in mix)


def fragmentation_delta(shape: NodeShape, free: int, gpus: int, mix: DemandMix) -> float:
    """How much placing on ``gpus`` out of ``free`` changes the node's fragmentation."""
    after = free & ~gpus
    return sum(
        share * (table[after] - table[free])
        for cls, share in mix
        for table in (unusable_table(shape, cls),)
    )


@dataclass
class Demand:
    """Decayed GPU demand per request class, from the distinct pods placement has seen.

    ``half_life`` is in pods: the weight of what was seen halves every ``half_life`` new pods.
    ``grid``: shares are rounded to multiples of it (so the mix, and the memo tables keyed by
    it, change only when the demand moves)."""

    half_life: float = 2000.0
    grid: float = 0.02
    prior: Iterable[tuple[DemandClass, float]] = ()
    _weights: dict[DemandClass, float] = field(default_factory=dict, init=False)
    _seen: set[str] = field(default_factory=set, init=False)
    _mix: DemandMix = field(default=(), init=False)
    _dirty: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        for cls, weight in self.prior:
            self._weights[cls] = self._weights.get(cls, 0.0) + weight

    def observe(self, request: PodRequest) -> None:
        if request.uid in self._seen:
            return
        if len(self._seen) >= 1 << 20:  # bounded: forgetting old pods only re-counts a retry
            self._seen.clear()
        self._seen.add(request.uid)
        decay = 0.5 ** (1.0 / self.half_life)
        for cls in self._weights:
            self._weights[cls] *= decay
        cls = demand_class(request)
        self._weights[cls] = self._weights.get(cls, 0.0) + request.gpus
        self._dirty = True

    def mix(self) -> DemandMix:
        if self._dirty:
            total = sum(self._weights.values())
            shares = (
                (cls, round(weight / total / self.grid) * self.grid)
                for cls, weight in self._weights.items()
            )
            mix = tuple(sorted(((c, round(s, 6)) for c, s in shares if s > 0), key=_class_key))
            self._mix = mix
            self._dirty = False
        return self._mix


def _class_key(item: tuple[DemandClass, float]) -> tuple[int, str, int]:
    (gpus, mode, tier), _ = item
    return (gpus, mode.value, int(tier))

"""The prioritize verb: a 0..10 score per node (kube-scheduler multiplies it by the extender's
weight) that orders nodes as filter ranks them, from the placements filter just found, or
ranked again when filter did not see them (a restart between the two calls)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidal.placement import PodRequest, filter_nodes

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender


def decide(ext: Extender, request: PodRequest, names: list[str]) -> list[tuple[str, int]]:
    with ext.cache.lock:
        remembered = ext.scores.pop(request.uid, None)
        if remembered is None or not set(names) <= remembered.keys():
            outcome = filter_nodes(ext.cache.snapshot, request, names, ext.demand.mix())
            remembered = outcome.scores()
    return [(n, remembered.get(n, 0)) for n in names]

"""The prioritize verb: a 0..10 score per node (kube-scheduler multiplies it by the extender's
weight), from the placements filter just found, or computed again when filter did not see them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidal.placement import PodRequest, fit_node, score
from tidal.placement.fit import Placement

if TYPE_CHECKING:
    from tidal.scheduler_extender.extender import Extender


def decide(ext: Extender, request: PodRequest, names: list[str]) -> list[tuple[str, int]]:
    with ext.cache.lock:
        remembered = ext.scores.pop(request.uid, None)
    if remembered is not None and set(names) <= remembered.keys():
        return [(n, remembered[n]) for n in names]
    with ext.cache.lock:
        return [(n, _score(ext, request, n)) for n in names]


def _score(ext: Extender, request: PodRequest, name: str) -> int:
    state = ext.cache.snapshot.nodes.get(name)
    if state is None:
        return 0
    outcome = fit_node(ext.cache.snapshot, state, request)
    return score(outcome, state.info.shape) if isinstance(outcome, Placement) else 0

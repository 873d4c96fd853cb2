"""The replay's cluster: one snapshot of every node, and one per set of GPU models that some
job is constrained to (openb's ``gpu_spec``, the spot trace's ``gpu_model``).

The placement core places a request on any node of the snapshot it is given, so a job that may
run only on some GPU models is placed, and preempted for, on a snapshot that holds only those
nodes. Every change is applied to the whole cluster and to each pool holding the node, so all
of them describe the same pods and reservations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tidal.placement import ClusterSnapshot, NodeInfo, PodInfo, Reservation
from tidal.simulator.workload import node_model


class ModelPools:
    def __init__(self, nodes: Sequence[NodeInfo], constraints: Iterable[frozenset[str]]) -> None:
        self.whole = ClusterSnapshot(nodes)
        self._pools: dict[frozenset[str], ClusterSnapshot] = {}
        self._of_node: dict[str, list[ClusterSnapshot]] = {}
        for models in sorted(set(constraints) - {frozenset()}, key=sorted):
            members = [n for n in nodes if node_model(n) in models]
            pool = ClusterSnapshot(members)
            self._pools[models] = pool
            for node in members:
                self._of_node.setdefault(node.name, []).append(pool)

    def view(self, models: frozenset[str]) -> ClusterSnapshot:
        """The snapshot a request constrained to ``models`` (empty: none) is placed on."""
        return self._pools[models] if models else self.whole

    def _touching(self, node: str) -> list[ClusterSnapshot]:
        return [self.whole, *self._of_node.get(node, ())]

    def set_now(self, now: float) -> None:
        self.whole.now = now
        for pool in self._pools.values():
            pool.now = now

    def add_pod(self, pod: PodInfo) -> None:
        for snapshot in self._touching(pod.node):
            snapshot.add_pod(pod)

    def remove_pod(self, uid: str) -> PodInfo:
        pod = self.whole.pods[uid]
        for snapshot in self._touching(pod.node):
            snapshot.remove_pod(uid)
        return pod

    def reserve(self, reservation: Reservation) -> None:
        for snapshot in self._touching(reservation.node):
            snapshot.reserve(reservation)

    def release(self, preemptor: str) -> None:
        reservation = self.whole.reservations.get(preemptor)
        if reservation is not None:
            for snapshot in self._touching(reservation.node):
                snapshot.release(preemptor)

    def expire_reservations(self) -> None:
        for reservation in self.whole.expire_reservations():
            for pool in self._of_node.get(reservation.node, ()):
                pool.release(reservation.preemptor)

"""The extender's view of the cluster: one live ClusterSnapshot fed by watch events.

The API server is the source of truth: GPU sets come from the ``tidal.dev/gpus`` annotation of
bound pods, reservations from the ``tidal.dev/reservation`` annotation of pending preemptors, so a
restarted extender rebuilds exactly what it had from one list of each kind. Every method takes
the lock: watch threads write, HTTP handlers read and plan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from tidal.placement import ClusterSnapshot, PdbInfo, PodInfo, Reservation, first_free_gpus
from tidal.scheduler_extender.translate import (
    GPUS,
    RESERVATION,
    SYSTEM_PRIORITY,
    ObjectError,
    ReservationRecord,
    annotations_of,
    is_terminal,
    node_info,
    parse_gpu_list,
    pod_gpus,
    pod_info,
    pod_key,
    topology_shape,
)
from tidal.topology import NodeShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pdb:
    namespace: str
    match_labels: dict[str, str]
    expressions: tuple[dict[str, Any], ...]
    allowed: int

    def selects(self, namespace: str, labels: dict[str, str]) -> bool:
        if namespace != self.namespace:
            return False
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(_expression_holds(e, labels) for e in self.expressions)


def _expression_holds(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator = expression.get("key", ""), expression.get("operator", "")
    values = expression.get("values") or []
    if operator == "In":
        return labels.get(key) in values
    if operator == "NotIn":
        return labels.get(key) not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    return False


class ClusterCache:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.snapshot = ClusterSnapshot([], now=clock())
        self.node_problems: dict[str, str] = {}  # nodes seen but unusable, with the reason
        self.pending: dict[str, dict[str, Any]] = {}  # unbound GPU pods by UID
        self.pods_by_key: dict[str, str] = {}  # namespace/name -> UID of every GPU pod known
        self._raw_bound: dict[str, dict[str, Any]] = {}  # bound GPU pods by UID (for PDB refresh)
        self._orphans: dict[str, dict[str, dict[str, Any]]] = {}  # node -> UID -> pod
        self._assumed: dict[str, int] = {}  # UID -> GPU mask chosen at bind, until the watch says
        self._pdbs: dict[str, Pdb] = {}
        self._raw_nodes: dict[str, dict[str, Any]] = {}
        self._published: dict[str, NodeShape] = {}  # node -> shape from its GPUTopology
        self._unhealthy: dict[str, int] = {}  # node -> GPUs its agent reports unhealthy
        self.synced: set[str] = set()

    # -- clock and reservations -------------------------------------------------------------
    def tick(self) -> list[Reservation]:
        """Advance the snapshot's clock; drop and return expired reservations."""
        with self.lock:
            self.snapshot.now = self.clock()
            return self.snapshot.expire_reservations()

    def reserve(self, reservation: Reservation) -> None:
        with self.lock:
            self.snapshot.reserve(reservation)

    def release(self, preemptor_uid: str) -> None:
        with self.lock:
            self.snapshot.release(preemptor_uid)

    # -- pods -------------------------------------------------------------------------------
    def upsert_pod(self, pod: dict[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid")
        if not uid:
            return
        with self.lock:
            try:
                gpus = pod_gpus(pod)
            except ObjectError as error:
                log.warning("ignoring pod: %s", error)
                return
            if gpus == 0 or is_terminal(pod):
                self.delete_pod(uid)
                return
            self.pods_by_key[pod_key(pod)] = uid
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                self._upsert_bound(uid, node, pod)
            else:
                self._upsert_pending(uid, pod)

    def _upsert_pending(self, uid: str, pod: dict[str, Any]) -> None:
        self.pending[uid] = pod
        text = annotations_of(pod).get(RESERVATION)
        if not text:  # absent, or blanked at bind
            return
        try:
            record = ReservationRecord.parse(text, pod_key(pod))
        except ObjectError as error:
            log.warning("ignoring reservation: %s", error)
            return
        current = self.snapshot.reservations.get(uid)
        wanted = record.reservation(uid)
        if current != wanted and record.expires_at > self.snapshot.now:
            self.snapshot.reserve(wanted)

    def _upsert_bound(self, uid: str, node: str, pod: dict[str, Any]) -> None:
        self.pending.pop(uid, None)
        self.snapshot.release(uid)
        self._raw_bound[uid] = pod
        state = self.snapshot.nodes.get(node)
        if state is None:
            self._drop_from_snapshot(uid)
            self._orphans.setdefault(node, {})[uid] = pod
            return
        try:
            info = self._bound_info(
                uid, pod, state.info.shape.gpu_count, state.info.shape.full_mask
            )
        except ObjectError as error:
            log.warning("pod holds GPUs the extender cannot place: %s", error)
            return
        old = self.snapshot.pods.get(uid)
        if old == info:
            return
        if old is not None:
            self.snapshot.remove_pod(uid)
        fence = self.snapshot.pods.get(_FENCE + node)
        if fence is not None and fence.gpus & info.gpus:
            self.snapshot.remove_pod(fence.uid)  # a pod holds a GPU that went bad: it wins
        try:
            self.snapshot.add_pod(info)
        except ValueError as error:
            # Two pods claim one GPU: only possible if something bound outside tidal.
            log.error("GPU conflict on node %s: %s", node, error)
        self._assumed.pop(uid, None)
        self._fence(node)

    def _bound_info(self, uid: str, pod: dict[str, Any], gpu_count: int, full: int) -> PodInfo:
        text = annotations_of(pod).get(GPUS)
        node = pod["spec"]["nodeName"]
        if text is not None:
            mask = parse_gpu_list(text, pod_key(pod), gpu_count)
        elif uid in self._assumed:
            mask = self._assumed[uid]
        else:
            # Bound without tidal (no annotation): hold the lowest free GPUs, as a
            # topology-blind device plugin would hand out.
            old = self.snapshot.pods.get(uid)
            used = self.snapshot.nodes[node].used & ~(old.gpus if old else 0)
            mask = first_free_gpus(full & ~used, pod_gpus(pod)) or 0
        info = pod_info(pod, mask)
        return replace(info, pdb=self._pdb_of(pod))

    def bound_pod(self, uid: str) -> dict[str, Any] | None:
        with self.lock:
            return self._raw_bound.get(uid)

    def assume(self, uid: str, gpus: int, pod: dict[str, Any]) -> None:
        """Record a binding the extender just made, before its watch event arrives."""
        with self.lock:
            self._assumed[uid] = gpus
            self._upsert_bound(uid, pod["spec"]["nodeName"], pod)

    def delete_pod(self, uid: str) -> None:
        with self.lock:
            pod = self.pending.pop(uid, None) or self._raw_bound.pop(uid, None)
            if pod is not None:
                self.pods_by_key.pop(pod_key(pod), None)
            bound = self.snapshot.pods.get(uid)
            self._drop_from_snapshot(uid)
            if bound is not None:
                self._fence(bound.node)
            self.snapshot.release(uid)
            self._assumed.pop(uid, None)
            for orphans in self._orphans.values():
                orphans.pop(uid, None)

    def _drop_from_snapshot(self, uid: str) -> None:
        if uid in self.snapshot.pods:
            self.snapshot.remove_pod(uid)

    # -- nodes ------------------------------------------------------------------------------
    def upsert_node(self, node: dict[str, Any]) -> None:
        name = (node.get("metadata") or {}).get("name", "")
        with self.lock:
            self._raw_nodes[name] = node
            try:
                info = node_info(node, self._published.get(name))
            except ObjectError as error:
                self.node_problems[name] = str(error)
                self._park_node_pods(name)
                return
            self.node_problems.pop(name, None)
            try:
                self.snapshot.set_node(info)
            except ValueError as error:
                self.node_problems[name] = str(error)
                return
            for uid, pod in self._orphans.pop(name, {}).items():
                self._upsert_bound(uid, name, pod)
            self._fence(name)

    def delete_node(self, name: str) -> None:
        with self.lock:
            self._raw_nodes.pop(name, None)
            self.node_problems.pop(name, None)
            self._park_node_pods(name)

    def _park_node_pods(self, name: str) -> None:
        for pod in self.snapshot.remove_node(name):
            if pod.uid.startswith(_FENCE):
                continue  # rebuilt from the topology when the node returns
            self._orphans.setdefault(name, {})[pod.uid] = self._raw_bound[pod.uid]

    # -- GPUTopology (published by the node agents) -----------------------------------------
    def upsert_topology(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        with self.lock:
            try:
                shape = topology_shape(obj)
            except ObjectError as error:
                log.warning("ignoring GPUTopology: %s", error)
                return
            unhealthy = _unhealthy_mask(obj, shape.full_mask)
            if self._published.get(name) is shape and self._unhealthy.get(name, 0) == unhealthy:
                return  # a heartbeat: nothing changed
            if unhealthy:
                self._unhealthy[name] = unhealthy
            else:
                self._unhealthy.pop(name, None)
            if self._published.get(name) is not shape:
                self._published[name] = shape
                self._refresh_node(name)
            self._fence(name)

    def published_topologies(self) -> int:
        with self.lock:
            return len(self._published)

    def unhealthy_gpus(self) -> int:
        """GPUs the node agents report unhealthy, over all nodes."""
        with self.lock:
            return sum(mask.bit_count() for mask in self._unhealthy.values())

    def delete_topology(self, name: str) -> None:
        with self.lock:
            self._unhealthy.pop(name, None)
            if self._published.pop(name, None) is not None:
                self._refresh_node(name)
            self._fence(name)

    def _fence(self, node: str) -> None:
        """Hold the node's unhealthy GPUs that no pod holds with a pseudo-pod that is never a
        victim: nothing is placed on them and no preemption plans to free them (the kubelet
        would not hand them out)."""
        state = self.snapshot.nodes.get(node)
        if state is None:
            return
        uid = _FENCE + node
        current = self.snapshot.pods.get(uid)
        held = state.used & ~(current.gpus if current else 0)
        wanted = self._unhealthy.get(node, 0) & state.info.shape.full_mask & ~held
        if current is not None and current.gpus == wanted:
            return
        if current is not None:
            self.snapshot.remove_pod(uid)
        if wanted:
            name = f"unhealthy GPUs of {node}"
            fence = PodInfo(uid, name, node, wanted, SYSTEM_PRIORITY, preemptible=False)
            self.snapshot.add_pod(fence)

    def _refresh_node(self, name: str) -> None:
        node = self._raw_nodes.get(name)
        if node is None:
            return
        self.upsert_node(node)  # keeps the node's pods (set_node refuses a shape they exceed)

    # -- PodDisruptionBudgets ---------------------------------------------------------------
    def upsert_pdb(self, pdb: dict[str, Any]) -> None:
        meta = pdb.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        selector = (pdb.get("spec") or {}).get("selector") or {}
        allowed = int((pdb.get("status") or {}).get("disruptionsAllowed") or 0)
        with self.lock:
            self._pdbs[key] = Pdb(
                namespace=meta.get("namespace", ""),
                match_labels=selector.get("matchLabels") or {},
                expressions=tuple(selector.get("matchExpressions") or ()),
                allowed=allowed,
            )
            self.snapshot.pdbs[key] = PdbInfo(key, allowed)
            self._refresh_pdb_members(meta.get("namespace", ""))

    def delete_pdb(self, key: str) -> None:
        with self.lock:
            pdb = self._pdbs.pop(key, None)
            self.snapshot.pdbs.pop(key, None)
            if pdb is not None:
                self._refresh_pdb_members(pdb.namespace)

    def _pdb_of(self, pod: dict[str, Any]) -> str | None:
        meta = pod.get("metadata") or {}
        namespace, labels = meta.get("namespace", ""), meta.get("labels") or {}
        return next((k for k, p in self._pdbs.items() if p.selects(namespace, labels)), None)

    def _refresh_pdb_members(self, namespace: str) -> None:
        for uid, pod in list(self._raw_bound.items()):
            if (pod.get("metadata") or {}).get("namespace") == namespace:
                self._upsert_bound(uid, pod["spec"]["nodeName"], pod)

    # -- lists and watch events ------------------------------------------------------------
    def _kinds(self) -> dict[str, _KindHandlers]:
        return {
            "nodes": _KindHandlers(
                _name, lambda: set(self.snapshot.nodes) | set(self.node_problems),
                self.upsert_node, self.delete_node,
            ),
            "pods": _KindHandlers(
                _uid, lambda: set(self.pending) | set(self._raw_bound),
                self.upsert_pod, self.delete_pod,
            ),
            "pdbs": _KindHandlers(
                _namespaced_name, lambda: set(self._pdbs), self.upsert_pdb, self.delete_pdb
            ),
            "gputopologies": _KindHandlers(
                _name, lambda: set(self._published), self.upsert_topology, self.delete_topology
            ),
        }  # fmt: skip

    def replace(self, kind: str, objects: Iterable[dict[str, Any]]) -> None:
        """Make the cache hold exactly ``objects`` of ``kind`` (after a list)."""
        objects = list(objects)
        handlers = self._kinds().get(kind)
        if handlers is None:
            raise ValueError(f"unknown kind {kind!r}")
        with self.lock:
            for key in handlers.known() - {handlers.key(o) for o in objects}:
                handlers.delete(key)
            for obj in objects:
                handlers.upsert(obj)
            self.synced.add(kind)

    def apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        """One watch event."""
        handlers = self._kinds()[kind]
        if event_type == "DELETED":
            handlers.delete(handlers.key(obj))
        else:
            handlers.upsert(obj)


@dataclass(frozen=True)
class _KindHandlers:
    key: Callable[[dict[str, Any]], str]
    known: Callable[[], set[str]]
    upsert: Callable[[dict[str, Any]], None]
    delete: Callable[[str], None]


_FENCE = "tidal.dev/unhealthy-gpus/"  # uid prefix of the pseudo-pods holding unhealthy GPUs


def _unhealthy_mask(topology: dict[str, Any], full: int) -> int:
    """GPUs a GPUTopology's status does not list as healthy (none before the first heartbeat)."""
    status = topology.get("status") or {}
    text = status.get("healthyGPUs")
    if not isinstance(text, str):
        return 0
    healthy = 0
    for part in filter(None, text.split(",")):
        if part.strip().isdigit():
            healthy |= 1 << int(part)
    return full & ~healthy


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _uid(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def _namespaced_name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace')}/{meta.get('name')}"

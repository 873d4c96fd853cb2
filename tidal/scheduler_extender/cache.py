"""The extender's view of the cluster: one live ClusterSnapshot fed by watch events.

The API server is the source of truth: GPU sets come from the ``tidal.dev/gpus`` annotation of
bound pods, reservations from the ``tidal.dev/reservation`` condition of pending preemptors, so a
restarted extender rebuilds exactly what it had from one list of each kind. Every method takes
the lock: watch threads write, HTTP handlers read and plan.

No object can stop the cache: a field that cannot be read is reported (``on_problem``: a metric
and an Event on the object) and left at a safe default, and a bound pod's GPUs stay accounted
whatever its annotations say. When a pod's GPU set is unknown (its annotation was corrupted
before this extender ever saw a good one), it holds every GPU of its node that no other pod
claims, shrinking as other pods show theirs: the extender would rather leave GPUs idle than give
one to a second pod. When two pods claim one GPU (something bound outside tidal), the later one
holds the GPUs it does not share and is added whole once the other leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from tidal import api
from tidal.placement import ClusterSnapshot, PdbInfo, PodInfo, Reservation, first_free_gpus
from tidal.scheduler_extender.pool import FENCE_PREFIX, PoolInputs
from tidal.scheduler_extender.translate import (
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
    reservation_message,
    topology_shape,
)
from tidal.topology import NodeShape

log = logging.getLogger(__name__)
WATCHED_KINDS = ("nodes", "pods", "pdbs", "gputopologies")  # what the reflectors list+watch


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


ProblemSink = Callable[[str, dict[str, Any], ObjectError], None]


def _log_problem(kind: str, obj: dict[str, Any], error: ObjectError) -> None:
    log.warning("%s: %s", kind, error)


class ClusterCache:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        max_reservation_s: float = 600.0,
        on_problem: ProblemSink = _log_problem,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.max_reservation_s = max_reservation_s  # no record holds GPUs longer than this
        self.on_problem = on_problem
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
        self._unknown: dict[str, set[str]] = {}  # node -> UIDs holding GPUs as "unknown set"
        self._conflicts: dict[str, dict[str, int]] = {}  # node -> UID -> GPUs it claims whole
        self._reported: dict[str, set[str]] = {}  # UID -> problems already reported
        self._local_reservations: set[str] = set()  # planned here, condition not yet seen
        self.synced: set[str] = set()
        self.apply_failures: dict[str, int] = {}  # kind -> changes that raised (bugs)

    # -- clock and reservations -------------------------------------------------------------
    def tick(self) -> list[Reservation]:
        """Advance the snapshot's clock; drop and return expired reservations."""
        with self.lock:
            self.snapshot.now = self.clock()
            return self.snapshot.expire_reservations()

    def reserve(self, reservation: Reservation) -> None:
        """Hold a plan made here; it stands until the pod's condition shows it (or is
        released), so a watch event from before the write does not drop it."""
        with self.lock:
            self.snapshot.reserve(reservation)
            self._local_reservations.add(reservation.preemptor)

    def release(self, preemptor_uid: str) -> None:
        with self.lock:
            self.snapshot.release(preemptor_uid)
            self._local_reservations.discard(preemptor_uid)

    # -- pods -------------------------------------------------------------------------------
    def upsert_pod(self, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata")
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if not isinstance(uid, str) or not uid:
            return
        spec = pod.get("spec")
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        with self.lock:
            if is_terminal(pod):
                self.delete_pod(uid)
            elif isinstance(node, str) and node:
                self._upsert_bound_pod(uid, node, pod)
            else:
                self._upsert_pending(uid, pod)

    def _report(self, kind: str, obj: dict[str, Any], error: ObjectError) -> None:
        """Tell ``on_problem`` once per object and problem (watch events repeat them)."""
        uid = (obj.get("metadata") or {}).get("uid") or pod_key(obj)
        seen = self._reported.setdefault(str(uid), set())
        if str(error) not in seen:
            seen.add(str(error))
            self.on_problem(kind, obj, error)

    def _requested_gpus(self, pod: dict[str, Any]) -> int | None:
        try:
            return pod_gpus(pod)
        except ObjectError as error:
            self._report("pod", pod, error)
            return None

    def _upsert_pending(self, uid: str, pod: dict[str, Any]) -> None:
        if not self._requested_gpus(pod):
            self.delete_pod(uid)  # no GPUs (or unreadable): nothing to place, nothing held
            return
        self.pods_by_key[pod_key(pod)] = uid
        self.pending[uid] = pod
        text = reservation_message(pod)
        if text is None:
            if uid in self.snapshot.reservations and uid not in self._local_reservations:
                self.snapshot.release(uid)  # cleared by the extender (expiry, or another replica)
            return
        try:
            record = ReservationRecord.parse(text, pod_key(pod))
        except ObjectError as error:
            self._report("pod", pod, error)
            return
        state = self.snapshot.nodes.get(record.node)
        if state is not None and max(record.gpus) >= state.info.shape.gpu_count:
            field = f"status.conditions[{api.CONDITION_RESERVATION}].message"
            self._report("pod", pod, ObjectError("pod", pod_key(pod), field, "GPU beyond node"))
            return
        # Bounded even if a clock was wrong when it was written.
        expires = min(record.expires_at, self.snapshot.now + self.max_reservation_s)
        wanted = replace(record, expires_at=expires).reservation(uid)
        current = self.snapshot.reservations.get(uid)
        if expires > self.snapshot.now and (
            current is None
            or (current.node, current.gpus, current.victims)
            != (wanted.node, wanted.gpus, wanted.victims)
        ):
            self.snapshot.reserve(wanted)
        self._local_reservations.discard(uid)

    def _upsert_bound_pod(self, uid: str, node: str, pod: dict[str, Any]) -> None:
        # A pod that requests no GPUs holds none, whatever its annotations say.
        if self._requested_gpus(pod) == 0:
            self.delete_pod(uid)
            return
        self.pods_by_key[pod_key(pod)] = uid
        self._upsert_bound(uid, node, pod)

    def _upsert_bound(self, uid: str, node: str, pod: dict[str, Any]) -> None:
        self.pending.pop(uid, None)
        self.snapshot.release(uid)
        self._local_reservations.discard(uid)
        self._raw_bound[uid] = pod
        moved = self.snapshot.pods.get(uid)
        if moved is not None and moved.node != node:  # the same UID on another node: a new pod
            self._forget_bound(uid, moved.node)
        state = self.snapshot.nodes.get(node)
        if state is None:
            self._drop_from_snapshot(uid)
            self._orphans.setdefault(node, {})[uid] = pod
            return
        info = self._bound_info(uid, pod, node)
        old = self.snapshot.pods.get(uid)
        if old == info:
            return
        if old is not None:
            self.snapshot.remove_pod(uid)
        self._yield_soft_holders(node, info.gpus, uid)
        taken = self.snapshot.nodes[node].used & info.gpus
        if taken:
            # Two pods claim one GPU: only possible if something bound outside tidal. Hold what
            # this one does not share; it gets the rest when the other leaves.
            log.error("GPU conflict on node %s: %s claims GPUs held by another pod", node, uid)
            self._conflicts.setdefault(node, {})[uid] = info.gpus
            info = replace(info, gpus=info.gpus & ~taken)
        elif uid in self._conflicts.get(node, {}):
            del self._conflicts[node][uid]
        self.snapshot.add_pod(info)
        self._assumed.pop(uid, None)
        self._fence(node)

    def _bound_info(self, uid: str, pod: dict[str, Any], node: str) -> PodInfo:
        mask = self._claimed_gpus(uid, pod, node)
        info, problems = pod_info(pod, mask)
        for problem in problems:
            self._report("pod", pod, problem)
        return replace(info, pdb=self._pdb_of(pod))

    def _claimed_gpus(self, uid: str, pod: dict[str, Any], node: str) -> int:
        """The GPUs a bound pod holds: its annotation; else what the extender chose at bind;
        else (bound without tidal) the lowest free ones, as a topology-blind device plugin
        would hand out. An unreadable annotation, or one naming more or fewer GPUs than the
        pod requests, keeps the last good set, else holds every GPU no other pod claims."""
        state = self.snapshot.nodes[node]
        shape = state.info.shape
        old = self.snapshot.pods.get(uid)
        unknown = self._unknown.setdefault(node, set())
        requested = self._requested_gpus(pod)
        text = annotations_of(pod).get(api.ANNOTATION_GPUS)
        if text is not None:
            try:
                mask = parse_gpu_list(text, pod_key(pod), shape.gpu_count)
                if requested is not None and mask.bit_count() != requested:
                    field = f"metadata.annotations[{api.ANNOTATION_GPUS}]"
                    problem = (
                        f"{text!r} names {mask.bit_count()} GPUs; the pod requests {requested}"
                    )
                    raise ObjectError("pod", pod_key(pod), field, problem)
                unknown.discard(uid)
                return mask
            except ObjectError as error:
                self._report("pod", pod, error)
            if old is not None and uid not in unknown:
                return old.gpus
            unknown.add(uid)
            return shape.full_mask & ~(state.used & ~(old.gpus if old else 0))
        if uid in self._assumed:
            return self._assumed[uid]
        if old is not None:
            return old.gpus
        return first_free_gpus(shape.full_mask & ~state.used, requested or 0) or 0

    def _yield_soft_holders(self, node: str, claim: int, claimant: str) -> None:
        """A pod showing its GPUs takes them from the fence and from unknown-set holders."""
        fence = self.snapshot.pods.get(_FENCE + node)
        if fence is not None and fence.gpus & claim:
            self.snapshot.remove_pod(fence.uid)  # a pod holds a GPU that went bad: it wins
        for uid in self._unknown.get(node, set()) - {claimant}:
            holder = self.snapshot.pods.get(uid)
            if holder is not None and holder.gpus & claim:
                self.snapshot.remove_pod(uid)
                self.snapshot.add_pod(replace(holder, gpus=holder.gpus & ~claim))

    def _retry_conflicts(self, node: str) -> None:
        """Pods that shared a GPU with another get it back when the other leaves."""
        for uid in list(self._conflicts.get(node, {})):
            pod = self._raw_bound.get(uid)
            if pod is None:
                del self._conflicts[node][uid]
                continue
            claim = self._conflicts[node][uid]
            current = self.snapshot.pods.get(uid)
            others = self.snapshot.nodes[node].used & ~(current.gpus if current else 0)
            if claim & others == 0 and current is not None:
                self.snapshot.remove_pod(uid)
                self.snapshot.add_pod(replace(current, gpus=claim))
                del self._conflicts[node][uid]

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
            self._raw_bound.pop(uid, None)
            if pod is not None and self.pods_by_key.get(pod_key(pod)) == uid:
                del self.pods_by_key[pod_key(pod)]
            bound = self.snapshot.pods.get(uid)
            self._drop_from_snapshot(uid)
            self.snapshot.release(uid)
            self._local_reservations.discard(uid)
            self._assumed.pop(uid, None)
            self._reported.pop(uid, None)
            for orphans in self._orphans.values():
                orphans.pop(uid, None)
            if bound is not None:
                self._forget_bound(uid, bound.node)

    def _forget_bound(self, uid: str, node: str) -> None:
        self._drop_from_snapshot(uid)
        self._unknown.get(node, set()).discard(uid)
        self._conflicts.get(node, {}).pop(uid, None)
        self._retry_conflicts(node)
        self._fence(node)

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
            raw = self._raw_bound.get(pod.uid)
            if raw is not None:
                self._orphans.setdefault(name, {})[pod.uid] = raw

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

    def pool_inputs(self) -> PoolInputs:
        """What the GPU pool view (``pool.gpu_pool``) reads, copied under the lock so the view
        is computed outside it."""
        with self.lock:
            return PoolInputs(
                nodes=tuple(self.snapshot.nodes.values()),
                unhealthy=dict(self._unhealthy),
                reservations=tuple(self.snapshot.reservations.values()),
                bound=dict(self._raw_bound),
                pending=dict(self.pending),
            )

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
            listed = {key for key in map(_safe_key(handlers.key), objects) if key is not None}
            for key in handlers.known() - listed:
                self._guarded(kind, handlers.delete, key)
            for obj in objects:
                self._guarded(kind, handlers.upsert, obj)
            self.synced.add(kind)

    def apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        """One watch event."""
        handlers = self._kinds()[kind]
        if event_type == "DELETED":
            key = _safe_key(handlers.key)(obj)
            if key is not None:
                self._guarded(kind, handlers.delete, key)
        else:
            self._guarded(kind, handlers.upsert, obj)

    def _guarded(self, kind: str, change: Callable[[Any], None], value: Any) -> None:
        """Apply one change; a bug on one object must not stop the events after it (the
        translation layer raises only ObjectError, and those are handled where read)."""
        try:
            change(value)
        except Exception:
            self.apply_failures[kind] = self.apply_failures.get(kind, 0) + 1
            log.exception("%s: could not apply a change; the object is left as it was", kind)


@dataclass(frozen=True)
class _KindHandlers:
    key: Callable[[dict[str, Any]], str]
    known: Callable[[], set[str]]
    upsert: Callable[[dict[str, Any]], None]
    delete: Callable[[str], None]


_FENCE = FENCE_PREFIX  # uid prefix of the pseudo-pods holding unhealthy GPUs


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


def _safe_key(key: Callable[[dict[str, Any]], str]) -> Callable[[Any], str | None]:
    def read(obj: Any) -> str | None:
        try:
            return key(obj)
        except (KeyError, TypeError):
            return None

    return read


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _uid(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def _namespaced_name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace')}/{meta.get('name')}"

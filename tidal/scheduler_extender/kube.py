"""The extender's Kubernetes side: list+watch reflectors feeding the cache, and the actions
(annotate, bind, evict, conditions, events) through the official client, as raw JSON."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from tidal import api
from tidal.kubeclient import KubeApiError, call, discard, read_json
from tidal.scheduler_extender.cache import WATCHED_KINDS, ClusterCache

log = logging.getLogger(__name__)
COMPONENT = "tidal-scheduler-extender"
# (connect, read) seconds for every action: a hung API server must not hold a verb past
# kube-scheduler's own extender timeout for long, nor pin a worker thread forever.
ACTION_TIMEOUT = (5.0, 10.0)
LIST_TIMEOUT = (5.0, 120.0)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeActions:
    def __init__(self, kube_api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(kube_api)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = call(
                f"get pod {namespace}/{name}",
                lambda: self.core.read_namespaced_pod(
                    name, namespace, _preload_content=False, _request_timeout=ACTION_TIMEOUT
                ),
            )
        except KubeApiError as error:
            if error.status == 404:
                return None
            raise
        pod: dict[str, Any] = read_json(response)
        return pod

    def _patch_condition(self, namespace: str, name: str, condition: dict[str, str]) -> None:
        # Strategic merge on conditions keys by type, so other conditions stay.
        body = {"status": {"conditions": [{**condition, "lastTransitionTime": _now()}]}}
        call(
            f"set condition {condition['type']} on pod {namespace}/{name}",
            lambda: discard(
                self.core.patch_namespaced_pod_status(
                    name, namespace, body, _preload_content=False, _request_timeout=ACTION_TIMEOUT
                )
            ),
        )

    def set_reservation(self, namespace: str, name: str, message: str) -> None:
        condition = {"type": api.CONDITION_RESERVATION, "status": "True", "reason": "GPUsReserved"}
        self._patch_condition(namespace, name, {**condition, "message": message})

    def end_reservation(self, namespace: str, name: str, reason: str) -> None:
        self._patch_condition(
            namespace,
            name,
            {"type": api.CONDITION_RESERVATION, "status": "False", "reason": reason},
        )
        if reason == "Bound":
            return  # a bound pod needs no retry
        body = {
            "metadata": {"annotations": {api.ANNOTATION_RESERVATION_ENDED: f"{reason} {_now()}"}}
        }
        call(
            f"annotate pod {namespace}/{name}",
            lambda: discard(
                self.core.patch_namespaced_pod(
                    name, namespace, body, _preload_content=False, _request_timeout=ACTION_TIMEOUT
                )
            ),
        )

    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid,
                "annotations": annotations,
            },
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        response = call(
            f"bind pod {namespace}/{name} to {node}",
            lambda: self.core.create_namespaced_binding(
                namespace, binding, _preload_content=False, _request_timeout=ACTION_TIMEOUT
            ),
        )
        discard(response)

    def mark_disruption_target(self, namespace: str, name: str, message: str) -> None:
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "PreemptionByScheduler",
            "message": message,
            "lastTransitionTime": _now(),
        }
        body = {"status": {"conditions": [condition]}}
        # Strategic merge on conditions keys by type, so other conditions stay.
        call(
            f"mark pod {namespace}/{name} as disruption target",
            lambda: discard(
                self.core.patch_namespaced_pod_status(
                    name, namespace, body, _preload_content=False, _request_timeout=ACTION_TIMEOUT
                )
            ),
        )

    def evict(self, namespace: str, name: str) -> None:
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        try:
            call(
                f"evict {namespace}/{name}",
                lambda: self.core.create_namespaced_pod_eviction(
                    name, namespace, eviction, _request_timeout=ACTION_TIMEOUT
                ),
            )
        except KubeApiError as error:
            if error.status != 404:  # 404: already gone
                raise

    def record_event(
        self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal"
    ) -> None:
        meta = pod["metadata"]
        event = {
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:10]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT},
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
            "count": 1,
        }
        try:
            call(
                f"record event for {meta['namespace']}/{meta['name']}",
                lambda: self.core.create_namespaced_event(
                    meta["namespace"], event, _request_timeout=ACTION_TIMEOUT
                ),
            )
        except KubeApiError as error:  # an event is best effort
            log.warning("%s", error)


class Reflector(threading.Thread):
    """List, then watch from the list's resourceVersion; relist on 410 Gone or errors.
    Objects stay raw dicts (orjson), which is several times cheaper than client models."""

    def __init__(
        self,
        kind: str,
        list_call: Callable[..., Any],
        cache: ClusterCache,
        stop: threading.Event,
        watch_timeout_s: int = 300,
        optional: bool = False,
    ) -> None:
        super().__init__(name=f"reflector-{kind}", daemon=True)
        self.kind = kind
        self.list_call = list_call
        self.cache = cache
        self.stop_event = stop
        self.watch_timeout_s = watch_timeout_s
        self.optional = optional  # a CRD that may not be installed: treat as empty, look again

    def run(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                version = self._list()
                backoff = 0.5
                while not self.stop_event.is_set():
                    version = self._watch(version)
            except _WatchExpiredError:
                log.info("%s watch expired; relisting", self.kind)
            except Exception as error:  # any failure: back off and relist
                if self.optional and isinstance(error, ApiException) and error.status == 404:
                    self._not_installed()
                    continue
                # Events may have been missed: not ready until a list makes the cache whole.
                self.cache.synced.discard(self.kind)
                log.warning(
                    "%s reflector error: %s; relisting in %.1f s", self.kind, error, backoff
                )
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _not_installed(self) -> None:
        if self.kind not in self.cache.synced:
            log.info("%s: resource not installed; looking again every 5 s", self.kind)
        self.cache.replace(self.kind, [])
        self.stop_event.wait(5.0)

    def _list(self) -> str:
        response = self.list_call(_preload_content=False, _request_timeout=LIST_TIMEOUT)
        body = read_json(response)
        self.cache.replace(self.kind, body.get("items") or [])
        version: str = body["metadata"]["resourceVersion"]
        log.info(
            "%s listed: %d objects at resourceVersion %s",
            self.kind,
            len(body["items"] or []),
            version,
        )
        return version

    def _watch(self, version: str) -> str:
        response = self.list_call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            # The server ends the watch after timeout_seconds; bookmarks arrive about every
            # minute, so a read idle for longer than both means a dead connection.
            _request_timeout=(5.0, self.watch_timeout_s + 60.0),
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(response):
                if self.stop_event.is_set():
                    break
                event = orjson.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpiredError
                    raise RuntimeError(obj.get("message", "watch error"))
                version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self.cache.apply(self.kind, kind, obj)
        finally:
            response.release_conn()
        return version


class _WatchExpiredError(Exception):
    pass


SYNCED_KINDS = frozenset(WATCHED_KINDS)


def start_reflectors(
    kube_api: client.ApiClient, cache: ClusterCache, stop: threading.Event
) -> list[Reflector]:
    core = client.CoreV1Api(kube_api)
    policy = client.PolicyV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    list_topologies = functools.partial(
        custom.list_cluster_custom_object, api.GROUP, api.VERSION, api.PLURAL_GPUTOPOLOGIES
    )
    reflectors = [
        Reflector("nodes", core.list_node, cache, stop),
        Reflector("pods", core.list_pod_for_all_namespaces, cache, stop),
        Reflector("pdbs", policy.list_pod_disruption_budget_for_all_namespaces, cache, stop),
        Reflector("gputopologies", list_topologies, cache, stop, optional=True),
    ]
    for reflector in reflectors:
        reflector.start()
    return reflectors


def wait_synced(cache: ClusterCache, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cache.synced >= SYNCED_KINDS:
            return True
        time.sleep(0.05)
    return False

"""Start the extender against a cluster: cache, reflectors, housekeeping, HTTP server.

Who may call the verbs: anyone who reaches the port can ask the extender to bind and to evict,
so it listens on loopback unless told otherwise (kube-scheduler beside it in one pod), and
refuses any other address unless callers must present a client certificate signed by
``tls_client_ca`` (kube-scheduler's extender ``tlsConfig`` presents one). Probes and Prometheus
use the health port, which serves no verb.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import queue
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tidal.kubeclient import api_client
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender, ExtenderSettings
from tidal.scheduler_extender.kube import (
    SYNCED_KINDS,
    KubeActions,
    start_reflectors,
    wait_synced,
)
from tidal.scheduler_extender.metrics import ExtenderMetrics
from tidal.scheduler_extender.server import Limits, create_app, create_health_app
from tidal.scheduler_extender.translate import ObjectError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8888
    kubeconfig: Path | None = None  # in-cluster config when None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # callers must present a certificate this CA signed
    health_host: str = "0.0.0.0"
    health_port: int = 0  # 0: no separate health port
    limits: Limits = field(default_factory=Limits)
    settings: ExtenderSettings = field(default_factory=ExtenderSettings)
    housekeeping_s: float = 5.0
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line for log pipelines

    def check(self) -> None:
        """Refuse a configuration that lets anyone who reaches the port act on the cluster."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a TLS certificate and its key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificates need TLS: give a serving certificate and key")
        if self.tls_client_ca is None and not is_loopback(self.host):
            raise ValueError(
                f"listening on {self.host} would let anyone who reaches it bind pods and evict "
                "them: listen on loopback (kube-scheduler in the same pod), or require client "
                "certificates with a client CA"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


ACTION_CONNECTIONS = 48  # > anyio's default of 40 worker threads
SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval (see serve)
MAX_CONNECTIONS = 512  # kube-scheduler keeps a handful; more is someone else
HEAD_TIMEOUT_S = 10.0  # a request head must arrive within this of connecting or of the last answer
KEEP_ALIVE_S = 30.0  # idle connections close after this


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with the limits it lacks: a connection that sends no complete
    request head within HEAD_TIMEOUT_S (idle, or a slowloris trickle) is closed, and
    connections beyond MAX_CONNECTIONS are closed at once."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


class ProblemReporter:
    """Counts unreadable fields and posts one Warning Event per object and problem, from a
    thread of its own (the cache calls it under its lock; an API call there would stall
    every verb). A full queue drops Events, never blocks: the metric still counts."""

    def __init__(self, actions: KubeActions, metrics: ExtenderMetrics) -> None:
        self.actions = actions
        self.metrics = metrics
        self.pending: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue(maxsize=1000)
        threading.Thread(target=self._post, name="problem-events", daemon=True).start()

    def __call__(self, kind: str, obj: dict[str, Any], error: ObjectError) -> None:
        self.metrics.object_problem(kind, error.field)
        log.warning("%s: %s", kind, error)
        meta = obj.get("metadata") or {}
        if kind == "pod" and meta.get("name") and meta.get("namespace") and meta.get("uid"):
            with contextlib.suppress(queue.Full):
                self.pending.put_nowait((obj, str(error)))

    def _post(self) -> None:
        while True:
            obj, message = self.pending.get()
            self.actions.record_event(obj, "InvalidField", message, kind="Warning")


def serve(options: ServeOptions) -> None:
    options.check()
    handler = logging.StreamHandler()
    if options.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=options.log_level.upper(), handlers=[handler])
    # filter answers on the event loop while binds and watches run in threads; a thread that
    # wants the GIL waits up to the switch interval for it, 5 ms by default, several times
    # filter's own time at 1,000 nodes, on the serial scheduling cycle. (Its effect on pods/s
    # alone was within run-to-run noise: bench/RESULTS.md.)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Actions run on the server's worker threads (anyio's 40): a pool smaller than that makes
    # urllib3 open and drop a TLS connection per bind, which profiling showed cost a quarter of
    # the extender's CPU at 1,000 nodes. Watches get a client of their own: they hold their
    # connections for minutes.
    actions_api = api_client(options.kubeconfig, pool_size=ACTION_CONNECTIONS)
    watch_api = api_client(options.kubeconfig, pool_size=len(SYNCED_KINDS))
    actions = KubeActions(actions_api)
    metrics = ExtenderMetrics()
    cache = ClusterCache(
        max_reservation_s=2 * options.settings.reservation_ttl_s,
        on_problem=ProblemReporter(actions, metrics),
    )
    extender = Extender(cache, actions, options.settings, metrics)
    stop = threading.Event()
    start_reflectors(watch_api, cache, stop)

    def housekeeping() -> None:
        if wait_synced(cache, timeout_s=600):
            # The cache is long-lived: keep it out of the GC's young generations.
            gc.freeze()
            log.info("cache synced: %s", extender.stats())
        while not stop.wait(options.housekeeping_s):
            extender.expire_reservations()

    threading.Thread(target=housekeeping, name="housekeeping", daemon=True).start()

    def ready() -> bool:
        return cache.synced >= SYNCED_KINDS

    servers = [uvicorn.Server(verb_config(options, create_app(extender, ready, options.limits)))]
    if options.health_port:
        health = create_health_app(extender, ready)
        servers.append(uvicorn.Server(health_config(options, health)))
    # uvicorn's own loop choice (uvloop when installed), for every server on one loop.
    loop_factory = servers[0].config.get_loop_factory() or asyncio.new_event_loop
    loop = loop_factory()
    try:
        loop.run_until_complete(_serve_all(servers))
    finally:
        loop.close()
        stop.set()


def verb_config(options: ServeOptions, app: Any) -> uvicorn.Config:
    tls: dict[str, Any] = {}
    if options.tls_cert is not None and options.tls_key is not None:
        tls = {"ssl_certfile": str(options.tls_cert), "ssl_keyfile": str(options.tls_key)}
    if options.tls_client_ca is not None:
        tls |= {"ssl_ca_certs": str(options.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        http=GuardedHttp,
        timeout_keep_alive=int(KEEP_ALIVE_S),
        limit_concurrency=MAX_CONNECTIONS,
        log_level=options.log_level,
        access_log=False,
        **tls,
    )


def health_config(options: ServeOptions, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=options.health_host,
        port=options.health_port,
        http=GuardedHttp,
        limit_concurrency=64,
        log_level=options.log_level,
        access_log=False,
    )


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    """Run the servers together; when one stops (a signal), stop the others."""
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)

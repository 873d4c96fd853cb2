"""HTTP service: the four verbs, /healthz, /readyz, /metrics and the read-only web view
(/dashboard, /dashboard/snapshot.json) (Starlette on uvicorn, orjson).

Bounded against slow or hostile callers: a body larger than ``max_body_bytes`` is refused with
413 before it is read whole, a body that does not arrive within ``body_timeout_s`` gets 408,
large bodies are parsed off the event loop one at a time (so a few of them cannot stall the
small, frequent calls kube-scheduler makes), and at most ``max_concurrent`` calls run at once.
Connection-level limits (request head timeout, idle keep-alive, connection count) are in
:mod:`tidal.scheduler_extender.run`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from tidal.scheduler_extender.cache import WATCHED_KINDS
from tidal.scheduler_extender.extender import Extender
from tidal.scheduler_extender.webview import build_snapshot
from tidal.scheduler_extender.wire import WireError, parse_bind, parse_filter, parse_preempt
from tidal.webview.page import content_security_policy, render_page

log = logging.getLogger(__name__)
JSON = "application/json"


@dataclass(frozen=True)
class Limits:
    """What one caller may cost the extender."""

    # A filter at 5,000 nodes with nodeCacheCapable sends ~100 KB of node names; full Node
    # lists (nodeCacheCapable false) are ~5 KB a node.
    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 5.0  # kube-scheduler's own extender timeout
    max_concurrent: int = 64  # beyond: the call waits for a slot
    large_body_bytes: int = 256 * 2**10  # parsed in a worker thread, one at a time


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


async def _read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _HttpError(413, f"body of {declared} bytes exceeds {limits.max_body_bytes}")
    chunks, size = [], 0
    async with asyncio.timeout(limits.body_timeout_s):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _HttpError(413, f"body exceeds {limits.max_body_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    extender: Extender, ready: Callable[[], bool], limits: Limits | None = None
) -> Starlette:
    metrics = extender.metrics
    limits = limits or Limits()
    slots = asyncio.Semaphore(limits.max_concurrent)
    large = asyncio.Semaphore(1)

    async def parse(body: bytes) -> Any:
        if len(body) < limits.large_body_bytes:
            return orjson.loads(body)
        async with large:
            return await run_in_threadpool(orjson.loads, body)

    def verb(
        name: str,
        handle: Callable[[Any], Any],
        inline: bool = False,
        read: Callable[[Any], Any] = lambda raw: raw,
        first: Callable[[Any], Any] | None = None,
    ) -> Callable[[Request], Awaitable[Response]]:
        """``read`` turns the JSON body into the verb's arguments; ``inline`` verbs are pure
        computation under the cache lock (no API calls on their hot path) and skip the thread
        hop; the others run in the thread pool, unless ``first`` answers on the event loop
        (it returns None when the call needs the thread)."""

        async def answer(request: Request) -> Response:
            try:
                args = read(await parse(await _read_body(request, limits)))
                result = first(args) if first is not None else None
                if result is None:
                    result = handle(args) if inline else await run_in_threadpool(handle, args)
                return _json(result)
            except (orjson.JSONDecodeError, WireError) as error:
                metrics.bad_requests.labels(name).inc()
                log.info("%s: bad request: %s", name, error)
                return _json({"Error": f"{name}: bad request: {error}"}, 400)
            except _HttpError as error:
                metrics.bad_requests.labels(name).inc()
                log.info("%s: refused: %s", name, error)
                return _json({"Error": f"{name}: {error}"}, error.status)
            except TimeoutError:
                metrics.bad_requests.labels(name).inc()
                return _json({"Error": f"{name}: body not received in time"}, 408)

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                async with slots:
                    return await answer(request)
            except ClientDisconnect:
                log.debug("%s: client went away before the answer", name)
                return Response(status_code=499)
            except Exception as error:  # never crash the server on one call
                log.exception("%s failed", name)
                return _json({"Error": f"{name}: internal error: {error}"}, 500)
            finally:
                metrics.latency.labels(name).observe(time.perf_counter() - started)

        return endpoint

    routes = [
        Route(
            "/filter",
            verb("filter", extender.filter, read=parse_filter, first=extender.filter_from_cache),
            methods=["POST"],
        ),
        Route(
            "/prioritize",
            verb(
                "prioritize",
                lambda raw: extender.prioritize(parse_filter(raw, "prioritize")),
                inline=True,
            ),
            methods=["POST"],
        ),
        Route(
            "/preempt",
            verb("preempt", lambda raw: extender.preempt(parse_preempt(raw))),
            methods=["POST"],
        ),
        Route("/bind", verb("bind", lambda raw: extender.bind(parse_bind(raw))), methods=["POST"]),
        *health_routes(extender, ready),
    ]
    return Starlette(routes=routes)


def health_routes(extender: Extender, ready: Callable[[], bool]) -> list[Route]:
    """/healthz, /readyz, /metrics and the web view: also served alone on the health port,
    which carries no verb, so probes, Prometheus and a port-forward need no client
    certificate. None of them changes anything (GET and HEAD only)."""
    metrics = extender.metrics

    async def healthz(_: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def readyz(_: Request) -> Response:
        if ready():
            return Response("ok", media_type="text/plain")
        return Response("cache not synced", status_code=503, media_type="text/plain")

    def exposition() -> bytes:
        metrics.export_cache(extender.stats(), extender.cache.apply_failures, WATCHED_KINDS)
        return generate_latest(metrics.registry)

    async def metrics_endpoint(_: Request) -> Response:
        # Off the event loop: the per-GPU series of a large pool take a while to render
        # (half a second at 1,000 eight-GPU nodes on a slow core), and the verbs may share
        # this loop.
        body = await run_in_threadpool(exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *webview_routes(extender),
    ]


# Neither the page nor its data is cached (both change every refresh) or sniffed as another type.
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def webview_routes(extender: Extender) -> list[Route]:
    """The live web view: the page, which fetches the snapshot beside it every 2 s."""
    # Relative, so the page also works behind a path prefix (kubectl proxy, an ingress).
    page = render_page("dashboard/snapshot.json", None)
    page_headers = {**_NO_STORE, "Content-Security-Policy": content_security_policy()}
    # One build at a time: however many pages poll (or a caller floods), the verbs sharing the
    # cache lock and the CPU wait for one snapshot's copy, not many.
    building = asyncio.Semaphore(1)

    async def dashboard(_: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    def snapshot_json() -> bytes:
        return orjson.dumps(build_snapshot(extender).to_json())

    async def snapshot(_: Request) -> Response:
        # Off the event loop, like /metrics: a large pool's snapshot takes a while to build.
        async with building:
            body = await run_in_threadpool(snapshot_json)
        return Response(body, media_type=JSON, headers=_NO_STORE)

    return [Route("/dashboard", dashboard), Route("/dashboard/snapshot.json", snapshot)]


def create_health_app(extender: Extender, ready: Callable[[], bool]) -> Starlette:
    return Starlette(routes=health_routes(extender, ready))

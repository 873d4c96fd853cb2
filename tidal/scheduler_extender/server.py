"""HTTP service: the four verbs, /healthz, /readyz and /metrics (Starlette on uvicorn, orjson)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidal.scheduler_extender.extender import Extender
from tidal.scheduler_extender.wire import WireError, parse_bind, parse_filter, parse_preempt

log = logging.getLogger(__name__)
JSON = "application/json"


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


def create_app(extender: Extender, ready: Callable[[], bool]) -> Starlette:
    metrics = extender.metrics

    def verb(
        name: str, handle: Callable[[Any], Any], inline: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """``inline`` verbs are pure computation under the cache lock (no API calls on their
        hot path) and skip the thread hop; the others run in the thread pool."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                raw = orjson.loads(await request.body())
                result = handle(raw) if inline else await run_in_threadpool(handle, raw)
                return _json(result)
            except (orjson.JSONDecodeError, WireError) as error:
                metrics.bad_requests.labels(name).inc()
                log.info("%s: bad request: %s", name, error)
                return _json({"Error": f"{name}: bad request: {error}"}, 400)
            except Exception as error:  # never crash the server on one call
                log.exception("%s failed", name)
                return _json({"Error": f"{name}: internal error: {error}"}, 500)
            finally:
                metrics.latency.labels(name).observe(time.perf_counter() - started)

        return endpoint

    async def healthz(_: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def readyz(_: Request) -> Response:
        if ready():
            return Response("ok", media_type="text/plain")
        return Response("cache not synced", status_code=503, media_type="text/plain")

    async def metrics_endpoint(_: Request) -> Response:
        for kind, value in extender.stats().items():
            metrics.cache_size.labels(kind).set(value)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route(
            "/filter",
            verb("filter", lambda raw: extender.filter(parse_filter(raw))),
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
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    return Starlette(routes=routes)

"""The worker's OpenAI-compatible HTTP server (Starlette on uvicorn).

:func:`build_app` serves ``/health``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` and ``/metrics``. :func:`serve` binds first and loads the engine in a
thread meanwhile (``/health`` answers 503 until it is ready), and on SIGTERM or SIGINT drains:
new requests get 503, requests in flight may finish for the grace period less a margin, the
rest are aborted, and the process exits 0.

Latency metrics (TTFT, ITL, end to end) are observed by the engine, which sees every token; the
server only exposes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tidal.inference_worker.engine.params import EngineClient, EngineDeadError
from tidal.inference_worker.metrics import CONTENT_TYPE, WorkerMetrics
from tidal.inference_worker.server.protocol import Kind, RequestError
from tidal.inference_worker.server.serving import (
    ABORTED,
    aborted_events,
    answer,
    engine_busy,
    engine_dead,
    open_stream,
    prepare,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

JSON = "application/json"
MAX_BODY_BYTES = 2**20  # a context's worth of text; token-id prompts are ~6 bytes a token
BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this ties up a connection
ABORT_MARGIN_S = 2.0  # of the grace period, kept for aborting what is left and exiting
ABORT_WAIT_S = 0.5  # for aborted requests to end before the server stops anyway
SHUTDOWN_WAIT_S = 1  # then uvicorn's wait for open connections before it cancels their tasks
CLIENT_GONE = 499  # nginx's status for "the client closed the request"


@dataclass
class ServerState:
    """What the server knows beyond the engine: whether it has loaded, died, or is draining,
    and how many requests are in flight. Touched only on the event loop, except ``engine`` and
    ``load_error`` (written once by the loader thread)."""

    engine: EngineClient | None = None  # None while loading: the server binds first
    draining: bool = False
    dead: str | None = None  # why the engine died
    load_error: str | None = None
    in_flight: int = 0
    aborting: bool = False  # the grace period is over: in-flight requests end now
    _abort_waiters: set[asyncio.Future[None]] = field(default_factory=set)

    def unavailable(self) -> str | None:
        """Why requests are refused now (a word for /health), or None."""
        if self.draining:
            return "draining"
        if self.dead is not None:
            return "engine dead"
        if self.load_error is not None:
            return "engine failed to load"
        if self.engine is None:
            return "loading"
        if not self.engine.is_ready():
            return "engine not ready"
        return None

    def request_done(self) -> None:
        self.in_flight -= 1

    def abort_in_flight(self) -> None:
        self.aborting = True
        for waiter in self._abort_waiters:
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.contextmanager
    def abort_signal(self) -> Iterator[asyncio.Future[None]]:
        """A future done when in-flight requests must end (a future of the request's own loop,
        so the state may outlive loops, as in tests)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.aborting:
            waiter.set_result(None)
        self._abort_waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._abort_waiters.discard(waiter)


class Stopped(enum.Enum):
    """Why a request's work was cancelled before it finished."""

    CLIENT_GONE = enum.auto()
    ABORTED = enum.auto()  # the grace period ran out


# ---------------------------------------------------------------------------- responses


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _error(error: RequestError, headers: dict[str, str] | None = None) -> Response:
    return _json(error.status, error.body(), headers)


def _refusal(state: ServerState, why: str) -> Response:
    if state.dead is not None:
        return _error(engine_dead(EngineDeadError(state.dead)))
    if why == "draining":
        # Connection: close, so a keep-alive client reconnects (to another replica).
        busy = engine_busy("the server is shutting down")
        return _error(busy, {"connection": "close"})
    return _error(engine_busy(f"the server is not ready ({why})"))


class _EventStream(StreamingResponse):
    """Server-sent events that close their generator (and with it the engine's iterator)
    however the response ends: finished, the client gone (Starlette cancels the stream), the
    grace period over (the stream ends with an error event), or the task cancelled."""

    def __init__(self, events: AsyncGenerator[bytes, None], state: ServerState) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
        self._events = events
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            await send(message)
            started = started or message["type"] == "http.response.start"

        try:
            with self._state.abort_signal() as aborted:
                streaming = asyncio.ensure_future(
                    super().__call__(scope, receive, send_noting_start)
                )
                try:
                    await asyncio.wait({streaming, aborted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    streaming.cancel()  # no-op when done
                    await asyncio.gather(streaming, return_exceptions=True)
            if not streaming.cancelled():
                streaming.result()  # re-raise what the stream raised, if anything
            else:
                await self._end_aborted(send, started)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._state.request_done()

    async def _end_aborted(self, send: Send, started: bool) -> None:
        if not started:
            start = {"type": "http.response.start", "status": self.status_code}
            await send(start | {"headers": self.raw_headers})
        await send({"type": "http.response.body", "body": aborted_events(), "more_body": False})


# ---------------------------------------------------------------------------- requests


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"the request body exceeds {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"the request body exceeds {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError as error:
        raise RequestError(408, "the request body did not arrive in time") from error
    return b"".join(chunks)


async def _read_json(request: Request, max_bytes: int) -> Any:
    try:
        return orjson.loads(await _read_body(request, max_bytes))
    except orjson.JSONDecodeError as error:
        raise RequestError(400, f"invalid JSON: {error}") from error


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_stopped(request: Request, state: ServerState, work: Awaitable[T]) -> T | Stopped:
    """``work``'s result, unless the client goes away or in-flight requests are aborted
    first: then ``work`` is cancelled, which closes the engine's iterator (vLLM's
    ``with_cancellation``, plus the abort at the end of the grace period)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    with state.abort_signal() as aborted:
        racing: set[asyncio.Future[Any]] = {task, gone, aborted}
        try:
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()  # no-op when done
            gone.cancel()
            await asyncio.gather(task, gone, return_exceptions=True)  # let their cleanup run
    if not task.cancelled():
        return task.result()
    return Stopped.ABORTED if aborted.done() else Stopped.CLIENT_GONE


def _stopped(why: Stopped) -> Response:
    if why is Stopped.ABORTED:
        return _error(engine_busy(ABORTED))
    return Response(status_code=CLIENT_GONE)  # nobody reads it


# ---------------------------------------------------------------------------- the app


def build_app(
    engine: EngineClient | None,
    metrics: WorkerMetrics,
    state: ServerState | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The server's routes. ``engine`` None (with a ``state``) serves 503 until something sets
    ``state.engine``, which is how :func:`serve` binds before the model has loaded."""
    state = state if state is not None else ServerState()
    if engine is not None:
        state.engine = engine
    started = int(time.time())

    async def health(_: Request) -> Response:
        why = state.unavailable()
        if why is None:
            return Response(status_code=200)
        return Response(why, status_code=503, media_type="text/plain")

    async def models(_: Request) -> Response:
        if state.engine is None:
            return _refusal(state, state.unavailable() or "loading")
        card = {
            "id": state.engine.model_name,
            "object": "model",
            "created": started,
            "owned_by": "tidal",
            "max_model_len": state.engine.max_model_len,
        }
        return _json(200, {"object": "list", "data": [card]})

    async def exposition(_: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    def completions(kind: Kind) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            why = state.unavailable()
            if why is not None or state.engine is None:
                return _refusal(state, why or "loading")
            state.in_flight += 1
            handed_over = False  # a stream counts itself out when it ends
            try:
                response = await _generate(request, state.engine, kind)
                handed_over = isinstance(response, _EventStream)
                return response
            finally:
                if not handed_over:
                    state.request_done()

        return endpoint

    def on_dead(error: EngineDeadError) -> None:
        if state.dead is None:
            log.error("the engine died: %s; /health now fails", error)
        state.dead = str(error) or type(error).__name__

    async def _generate(request: Request, engine: EngineClient, kind: Kind) -> Response:
        try:
            prepared = await prepare(engine, kind, await _read_json(request, max_body_bytes))
            if not prepared.stream:
                answered = await _until_stopped(request, state, answer(engine, prepared))
                return _stopped(answered) if isinstance(answered, Stopped) else _json(*answered)
            opened = await _until_stopped(request, state, open_stream(engine, prepared, on_dead))
            if isinstance(opened, Stopped):
                return _stopped(opened)
            if isinstance(opened, tuple):
                return _json(*opened)
            return _EventStream(opened, state)
        except RequestError as error:
            return _error(error)
        except EngineDeadError as error:
            on_dead(error)
            return _error(engine_dead(error))
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE)
        except Exception as error:  # one request's bug must not take the server down
            log.exception("%s request failed", kind)
            failure = RequestError(500, f"internal error: {error}", None, "InternalServerError")
            return _error(failure)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions("completions"), methods=["POST"]),
        Route("/v1/chat/completions", completions("chat"), methods=["POST"]),
        Route("/metrics", exposition, methods=["GET"]),
    ]
    return Starlette(routes=routes)


# ---------------------------------------------------------------------------- serving


def drain_budget(grace_s: float) -> float:
    """How long in-flight requests may run after SIGTERM: the grace period less a margin to
    abort the rest and exit before the kubelet's SIGKILL."""
    return max(0.0, grace_s - min(ABORT_MARGIN_S, grace_s / 2))


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT instead of closing at once, starts the engine's
    loader once it is listening, and stops when the engine fails to load."""

    def __init__(
        self, config: uvicorn.Config, state: ServerState, grace_s: float, load: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_budget(grace_s)
        self._load = load
        self._loading = False
        self._announced_ready = False
        self._signal: int | None = None
        self._deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would stop at once, and re-raise the signal after shutting down
        # (an exit status of 128 + N instead of 0). In a signal handler: set flags, log later.
        if self.state.draining:  # a second signal: stop waiting
            self._deadline = 0.0
            return
        self._signal = sig
        self._deadline = time.monotonic() + self.drain_s
        self.state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.started and not self._loading:
            self._loading = True
            threading.Thread(target=self._load, name="engine-loader", daemon=True).start()
        if self.state.draining:
            self._drain_step()
        elif self.state.load_error is not None:
            self.should_exit = True
        elif not self._announced_ready and self.state.unavailable() is None:
            self._announced_ready = True
            log.info("ready: serving %s", getattr(self.state.engine, "model_name", "?"))
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        if self._signal is not None:
            name = signal.Signals(self._signal).name
            log.info(
                "%s: draining %d requests (up to %.1f s); new requests get 503",
                name, self.state.in_flight, self.drain_s,
            )  # fmt: skip
            self._signal = None
        now = time.monotonic()
        if self.should_exit:
            return
        if self.state.in_flight == 0:
            log.info("no requests in flight")
            self.should_exit = True
        elif not self.state.aborting and now >= self._deadline:
            log.warning("grace period over: aborting %d requests", self.state.in_flight)
            self.state.abort_in_flight()
        elif self.state.aborting and now >= self._deadline + ABORT_WAIT_S:
            log.warning("%d requests did not end; stopping anyway", self.state.in_flight)
            self.should_exit = True


def _load_engine(build_engine: Callable[[], EngineClient], state: ServerState) -> None:
    try:
        started = time.monotonic()
        engine = build_engine()
    except BaseException as error:  # the process exits non-zero with this reason
        log.exception("the engine failed to load")
        state.load_error = str(error) or type(error).__name__
        return
    log.info("engine loaded in %.1f s", time.monotonic() - started)
    state.engine = engine


def _configure_logging(level: str) -> None:
    """Plain lines on stderr, unless the caller configured logging already."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def serve(
    build_engine: Callable[[], EngineClient],
    metrics: WorkerMetrics,
    host: str = "0.0.0.0",
    port: int = 8000,
    grace_s: float = 30.0,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
    access_log: bool = False,
    close_engine: Callable[[EngineClient], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (then drain) or a failed load; the process's exit status.

    Binds ``host:port`` first, then runs ``build_engine`` in a thread (it has no event loop;
    the engine's ``generate`` is called on the server's). ``grace_s`` is the pod's termination
    grace period. ``close_engine`` runs after the server stopped. Returns 0 after a signal, 1
    when the engine failed to load."""
    _configure_logging(log_level)
    state = ServerState()
    app = build_app(None, metrics, state, max_body_bytes)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_WAIT_S,
    )
    server = DrainingServer(config, state, grace_s, lambda: _load_engine(build_engine, state))
    log.info(
        "starting on %s:%d; the engine loads once bound (/health is 503 until ready)", host, port
    )
    server.run()
    if close_engine is not None and state.engine is not None:
        close_engine(state.engine)
    code = 1 if state.load_error is not None else 0
    log.info("exit %d", code)
    return code

"""The engine on rank 0: a synchronous :class:`LLMEngine` (schedule, run the step on every rank,
sample, detokenize, finish) and :class:`AsyncEngine`, which runs it in a thread and streams
each request's outputs to asyncio callers (the server, the batch runner).

Tensor-parallel ranks above 0 run :func:`follow`: they receive each step's work from rank 0
and compute their shard of it, so every rank runs the same plan in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidal.inference_worker.engine.blocks import BlockPool
from tidal.inference_worker.engine.output import next_text
from tidal.inference_worker.engine.params import (
    EngineDeadError,
    EngineDrainingError,
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenizerLike,
)
from tidal.inference_worker.engine.runner import ModelRunner, Segment, StepWork
from tidal.inference_worker.engine.scheduler import Plan, Scheduler, SchedulerConfig
from tidal.inference_worker.engine.sequence import Sequence as Seq
from tidal.inference_worker.generate import sample
from tidal.inference_worker.iso_split import OpCosts, choose_split
from tidal.inference_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    prefix_cache: bool = True
    iso_min_tokens: int = 256

    def __post_init__(self) -> None:
        capacity = self.num_blocks * self.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.num_blocks} blocks of "
                f"{self.block_size}), less than max_model_len {self.max_model_len}: give it "
                "more memory (--kv-cache-memory) or lower --max-model-len"
            )


class LLMEngine:
    """Rank 0's side of every step. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: TokenizerLike,
        config: EngineConfig,
        metrics: WorkerMetrics | None = None,
        costs: OpCosts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.comm = runner.model.comm
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.costs = costs
        self.clock = clock
        self.pool = BlockPool(config.num_blocks, config.block_size, config.prefix_cache)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_batched_tokens), self.pool
        )
        self.requests: dict[str, Seq] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.eos = frozenset(tokenizer.eos_token_ids)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> Seq:
        room = self.config.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; max_model_len is "
                f"{self.config.max_model_len}"
            )
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seq = Seq(request_id, list(prompt_ids), params, max_tokens, arrival=self.clock())
        if params.seed is not None:
            self.generators[request_id] = torch.Generator().manual_seed(params.seed)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self.generators.pop(request_id, None)
            self._observe_finish(seq)

    def step(self) -> list[RequestOutput]:
        """One forward step over every scheduled sequence; the outputs it produced."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        now = self.clock()
        for seq in plan.admitted:
            seq.scheduled_at = now
        work = self._work(plan)
        if self.comm.world > 1:
            self.comm.broadcast_object(work)
        logits = self.runner.execute(work)
        sampling = [c.seq for c in plan.chunks if c.samples]
        tokens = self._sample(logits, sampling) if sampling else []
        self.scheduler.advance(plan, dict(zip(sampling, tokens, strict=True)))
        self._observe_step(plan, work)
        return [self._emit(seq) for seq in sampling]

    def heartbeat(self) -> None:
        if self.comm.world > 1:
            self.comm.broadcast_object(HEARTBEAT)

    def shutdown_followers(self) -> None:
        """Tell ranks above 0 to leave :func:`follow`."""
        if self.comm.world > 1:
            self.comm.broadcast_object(None)

    # ------------------------------------------------------------------ internals

    def _work(self, plan: Plan) -> StepWork:
        segments, ids = [], []
        for chunk in plan.chunks:
            seq = chunk.seq
            ids += seq.tokens[chunk.start : chunk.start + chunk.count]
            segments.append(Segment(chunk.start, chunk.count, tuple(seq.blocks), chunk.samples))
        split = None
        if len(segments) == 1 and self.costs is not None and self.comm.world > 1:
            choice = choose_split(self.costs, segments[0].count, len(self.runner.model.layers),
                                  min_tokens=self.config.iso_min_tokens)  # fmt: skip
            split = choice.split
        return StepWork(tuple(ids), tuple(segments), split)

    def _sample(self, logits: torch.Tensor | None, seqs: list[Seq]) -> list[int]:
        assert logits is not None, "rank 0 holds the logits"
        if all(s.params.temperature == 0 for s in seqs):
            return [int(t) for t in logits.argmax(-1).tolist()]
        return [
            sample(logits[i], s.params, self.generators.get(s.request_id))
            for i, s in enumerate(seqs)
        ]

    def _emit(self, seq: Seq) -> RequestOutput:
        """The news for ``seq`` after it got a token: its text delta, and whether it ended."""
        now = self.clock()
        self._observe_token(seq, now)
        reason = self._finish_reason(seq)
        token = seq.tokens[-1]
        stopped_by_token = reason == "stop"
        visible = seq.output_ids[:-1] if stopped_by_token else seq.output_ids
        text = self.tokenizer.decode(visible)
        step = next_text(text, seq.sent_text, seq.params.stop, final=reason is not None)
        if step.stopped:
            reason = "stop"
        seq.sent_text += step.delta
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
            self.generators.pop(seq.request_id, None)
            self._observe_finish(seq)
        return RequestOutput(
            seq.request_id, step.delta, () if stopped_by_token else (token,), seq.num_prompt,
            seq.num_output, reason is not None, reason, seq.cached_prompt_tokens,
        )  # fmt: skip

    def _finish_reason(self, seq: Seq) -> FinishReason | None:
        token = seq.tokens[-1]
        if (token in self.eos and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            return "stop"
        if seq.num_output >= seq.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            return "length"
        return None

    # ------------------------------------------------------------------ metrics

    def _observe_step(self, plan: Plan, work: StepWork) -> None:
        m = self.metrics
        if m is None:
            return
        m.iteration_tokens.observe(plan.num_tokens)
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.pool.usage)
        if plan.preempted:
            m.preempted(len(plan.preempted))
        for seq in plan.admitted:
            m.prompt_tokens(seq.num_prompt)
            m.prefix_cache(seq.num_prompt, seq.cached_prompt_tokens)
        if any(s.count > 1 for s in work.segments):
            m.prefill("iso" if work.iso_split is not None else "serial")

    def _observe_token(self, seq: Seq, now: float) -> None:
        m = self.metrics
        if seq.first_token_at is None:
            seq.first_token_at = now
            if m is not None:
                m.ttft.observe(now - seq.arrival)
        elif m is not None and seq.last_token_at is not None:
            m.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if m is not None:
            m.generation_tokens(1)

    def _observe_finish(self, seq: Seq) -> None:
        m = self.metrics
        if m is None or seq.finish_reason is None:
            return
        now = self.clock()
        m.request_finished(seq.finish_reason)
        m.e2e.observe(now - seq.arrival)
        if seq.scheduled_at is not None:
            m.queue_time.observe(seq.scheduled_at - seq.arrival)
            if seq.first_token_at is not None:
                m.prefill_time.observe(seq.first_token_at - seq.scheduled_at)
                m.decode_time.observe(now - seq.first_token_at)
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.pool.usage)


HEARTBEAT = "heartbeat"  # an idle rank 0's step: keeps followers' waits short, finds dead ones


def follow(runner: ModelRunner) -> None:
    """A rank above 0: run every step rank 0 broadcasts, until it broadcasts None."""
    comm = runner.model.comm
    while True:
        work = comm.broadcast_object(None)
        if work is None:
            return
        if work != HEARTBEAT:
            runner.execute(work)


# ---------------------------------------------------------------------- asyncio bridge


class AsyncEngine:
    """:class:`~tidal.inference_worker.engine.params.EngineClient` over an :class:`LLMEngine`
    driven by one background thread. Binds before the model is loaded (:meth:`attach`)."""

    IDLE_WAIT_S = 0.5
    HEARTBEAT_S = 30.0

    def __init__(self, model_name: str, max_model_len: int, tokenizer: TokenizerLike) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.engine: LLMEngine | None = None
        self.draining = False
        self.dead: BaseException | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.on_death: Callable[[BaseException], None] = lambda _: None

    # ------------------------------------------------------------------ lifecycle

    def attach(self, engine: LLMEngine) -> None:
        """Start serving with a loaded engine."""
        self.engine = engine
        self.max_model_len = engine.config.max_model_len
        self._thread = threading.Thread(target=self._loop, name="tidal-engine", daemon=True)
        self._thread.start()

    def is_ready(self) -> bool:
        return self.engine is not None and not self.draining and self.dead is None

    def drain(self) -> None:
        """Stop admitting; running requests go on."""
        self.draining = True

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, stop the loop (and the followers)."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ requests

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        if self.dead is not None:
            raise EngineDeadError(f"the engine died: {self.dead}")
        if self.draining or self.engine is None:
            raise EngineDrainingError("draining" if self.draining else "loading")
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", (request_id, list(prompt_ids), params)))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the caller left (a client disconnect): free its blocks
                self._inbox.put(("abort", request_id))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        engine = self.engine
        assert engine is not None
        last_step = time.monotonic()
        try:
            while not self._stop.is_set():
                self._take_inbox(engine, block=not engine.has_work)
                if engine.has_work:
                    for output in engine.step():
                        self._deliver(output.request_id, output)
                    last_step = time.monotonic()
                elif time.monotonic() - last_step > self.HEARTBEAT_S:
                    engine.heartbeat()
                    last_step = time.monotonic()
            for request_id in list(engine.requests):
                engine.abort(request_id)
                self._deliver(request_id, EngineDrainingError("the engine shut down"))
            engine.shutdown_followers()
        except BaseException as error:  # a dead rank, a kernel error: fail loudly, never hang
            log.exception("the engine loop died")
            self.dead = error
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine died: {error}"))
            self.on_death(error)

    def _take_inbox(self, engine: LLMEngine, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(engine, *item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, engine: LLMEngine, kind: str, payload: Any) -> None:
        if kind == "add":
            request_id, prompt_ids, params = payload
            try:
                engine.add(request_id, prompt_ids, params)
            except ValueError as error:
                self._deliver(request_id, error)
        elif kind == "abort":
            engine.abort(payload)

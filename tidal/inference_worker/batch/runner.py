"""The offline batch runner: one shard of an OpenAI Batch input file, answered by the engine,
written in order, checkpointed so a preempted worker loses at most one interval of work.

The per-record work is a dependency (``respond``: url and body in, status and body out), so
the runner knows nothing of the engine; the CLI wires it to the server's ``complete``.

Lifecycle of an attempt::

    resume (latest checkpoint in the output store; verified)  ──complete──▶ exit 0
      │
      ▼
    dispatch records (up to ``concurrency`` in flight; output in input order)
      │  every TIDAL_CHECKPOINT_INTERVAL_SECONDS: close the part, write a checkpoint, annotate
      ├── input exhausted, all written ─▶ final checkpoint, "complete": true ─▶ exit 0
      ├── SIGTERM ─▶ stop dispatching; in-flight records get ``grace_s`` ─▶ checkpoint ─▶ 143
      └── respond raised (engine dead) ─▶ checkpoint what is done ─▶ exit 1

Exit codes: the operator counts a Succeeded pod as a finished worker, so 0 means exactly
"this shard is complete"; 2 is a configuration no retry can fix (the message names the
variable); 143 (128 + SIGTERM) a clean stop after its checkpoint; 1 anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tidal.inference_worker.batch import podnote as podnotes
from tidal.inference_worker.batch.checkpoint import (
    Checkpoint,
    Resume,
    checkpoint_name,
    find_resume,
    verify,
)
from tidal.inference_worker.batch.jsonl import (
    BadLine,
    Record,
    error_line,
    parse_line,
    response_line,
    shard_records,
    with_seed,
)
from tidal.inference_worker.batch.store import (
    ConfigError,
    Part,
    PartFile,
    Store,
    check_uri,
    input_files,
    local_form,
    read_lines,
)
from tidal.inference_worker.batch.writer import OrderedWriter
from tidal.inference_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

Respond = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]
PodNote = Callable[[str], None]

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd process

# tidal.operator.pods.JOB_GRACE_S (the worker may not import the operator). In-flight records
# get 60% of it after SIGTERM; the rest is for the checkpoint (a part upload) and the annotation.
POD_GRACE_S = 120
DEFAULT_GRACE_S = 0.6 * POD_GRACE_S
DEFAULT_CONCURRENCY = 32
DEFAULT_INTERVAL_S = 600.0  # the LLMBatchJob default (checkpointIntervalSeconds)
WINDOW_PER_SLOT = 4  # finished-ahead results buffered per in-flight slot
READ_CHUNK = 256  # input lines read per trip to a thread (object store reads block)
HTTP_ERROR = 400


# -- settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSettings:
    """A batch worker's configuration: the TIDAL_* variables of its pod (operator/pods.py)."""

    input_uri: str
    output_uri: str
    shard_index: int
    shard_count: int
    checkpoint_interval_s: float = DEFAULT_INTERVAL_S
    resume_from: str | None = None
    attempt: int = 0
    model_name: str = ""
    pod_name: str | None = None
    pod_namespace: str | None = None

    @property
    def shard(self) -> str:
        """``"i/n"``, as TIDAL_SHARD spells it."""
        return f"{self.shard_index}/{self.shard_count}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BatchSettings:
        """The settings in ``env``; ValueError naming the first variable that is wrong."""
        input_uri = _uri(env, "TIDAL_INPUT_URI")
        output_uri = _uri(env, "TIDAL_OUTPUT_URI")
        _check_apart(input_uri, output_uri)
        index, count = parse_shard(env.get("TIDAL_SHARD", ""))
        resume_from = env.get("TIDAL_RESUME_FROM", "").strip() or None
        if resume_from is not None:
            check_uri(resume_from, "TIDAL_RESUME_FROM")
        return cls(
            input_uri=input_uri,
            output_uri=output_uri,
            shard_index=index,
            shard_count=count,
            checkpoint_interval_s=_interval(env),
            resume_from=resume_from,
            attempt=_attempt(env),
            model_name=env.get("TIDAL_MODEL_NAME", ""),
            pod_name=env.get("TIDAL_POD_NAME") or None,
            pod_namespace=env.get("TIDAL_POD_NAMESPACE") or None,
        )


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as (i, n), 0 <= i < n; ValueError naming TIDAL_SHARD."""
    index, slash, count = text.strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not slash or n < 1 or not 0 <= i < n:
        raise ValueError(f"TIDAL_SHARD must be 'i/n' with 0 <= i < n, got {text!r}")
    return i, n


def _uri(env: Mapping[str, str], variable: str) -> str:
    uri = env.get(variable, "").strip()
    if not uri:
        raise ValueError(f"{variable} is not set")
    check_uri(uri, variable)
    return uri.rstrip("/") or uri


def _check_apart(input_uri: str, output_uri: str) -> None:
    """Output inside the input would be read back as input by the next attempt."""
    source = local_form(input_uri) or input_uri
    target = local_form(output_uri) or output_uri
    if target == source or target.startswith(source.rstrip("/") + "/"):
        raise ValueError(f"TIDAL_OUTPUT_URI {output_uri!r} is inside TIDAL_INPUT_URI {input_uri!r}")


def _interval(env: Mapping[str, str]) -> float:
    text = env.get("TIDAL_CHECKPOINT_INTERVAL_SECONDS", "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"TIDAL_CHECKPOINT_INTERVAL_SECONDS must be a positive number of seconds, got {text!r}"
        )
    return value


def _attempt(env: Mapping[str, str]) -> int:
    text = env.get("TIDAL_ATTEMPT", "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"TIDAL_ATTEMPT must be a non-negative integer, got {text!r}")
    return int(text)


# -- result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchResult:
    """How an attempt ended. ``next_record``: the shard's records done (all attempts);
    ``written``: the lines this attempt wrote; ``total``: the shard's records, once known."""

    exit_code: int
    next_record: int = 0
    total: int | None = None
    complete: bool = False
    checkpoint: str | None = None
    written: int = 0
    message: str = ""


# -- one attempt at one shard -----------------------------------------------------------------
def _take(records: Iterator[Record], count: int) -> list[Record]:
    return list(islice(records, count))


class _ShardRun:
    """The state of one attempt: the writer, the open part, the parts and checkpoints so far."""

    def __init__(
        self,
        settings: BatchSettings,
        respond: Respond,
        store: Store,
        resume: Resume,
        source: tuple[Any, list[str]],
        *,
        podnote: PodNote | None,
        metrics: WorkerMetrics | None,
        concurrency: int,
        grace_s: float,
    ) -> None:
        self.settings, self.respond, self.store = settings, respond, store
        self.source, self.podnote, self.metrics = source, podnote, metrics
        self.concurrency, self.grace_s = concurrency, grace_s
        done = resume.checkpoint
        self.parts: list[Part] = list(done.parts) if done else []
        self.start = done.next_record if done else 0
        self.saved_next = self.start  # next_record of the last checkpoint written
        self.checkpoint_uri = resume.uri
        self.number = resume.next_number  # of the next checkpoint file
        # Parts are numbered across attempts (not per attempt), so no name ever repeats one a
        # checkpoint lists, even if an attempt number were reused.
        self.part_seq = len(self.parts)
        self.part: PartFile | None = None
        self.writer: OrderedWriter[tuple[bytes, bool]] = OrderedWriter(
            self._write, window=WINDOW_PER_SLOT * concurrency, start=self.start
        )
        self.total: int | None = None
        self.halt = asyncio.Event()  # stop dispatching: SIGTERM or a failure
        self.stopped_at: float | None = None
        self.failure: BaseException | None = None
        self.poisoned = False  # a part was lost: no checkpoint may claim its records
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.began = self.loop.time()

    # The attempt, start to end.
    async def run(self, stop: asyncio.Event) -> BatchResult:
        if self.checkpoint_uri is not None:
            await self._note(self.checkpoint_uri)  # this pod's annotation starts empty
        watcher = asyncio.create_task(self._watch(stop))
        ticker = asyncio.create_task(self._tick())
        try:
            await self._drain(await self._dispatch())
        finally:
            self.halt.set()
            watcher.cancel()
            await asyncio.gather(watcher, ticker, return_exceptions=True)
            if self.part is not None and self.poisoned:
                self.part.discard()
        return await self._finish()

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stopped_at = self.loop.time()
        log.info("stop requested: finishing in-flight records for up to %.0f s", self.grace_s)
        self.halt.set()

    async def _tick(self) -> None:
        interval = self.settings.checkpoint_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.halt.wait(), timeout=interval)
                return
            try:
                await self._checkpoint(complete=False)
            except Exception as error:
                self._fail(error, "checkpoint failed")
                return

    def _fail(self, error: BaseException, what: str) -> None:
        if self.failure is None:
            self.failure = error
            log.error("%s: %s", what, error, exc_info=error)
        self.halt.set()

    # Reading and dispatching.
    async def _records(self) -> AsyncGenerator[Record, None]:
        fs, files = self.source
        s = self.settings
        records = shard_records(read_lines(fs, files), s.shard_index, s.shard_count, self.start)
        count = self.start
        try:
            while chunk := await asyncio.to_thread(_take, records, READ_CHUNK):
                count = chunk[-1].ordinal + 1
                for record in chunk:
                    yield record
            self.total = count
        finally:
            with contextlib.suppress(ValueError):  # a read still running in its thread
                records.close()

    async def _unless_halted(self, waiting: Awaitable[Any]) -> bool:
        """Await ``waiting`` unless the halt comes first; whether it finished."""
        task = asyncio.ensure_future(waiting)
        halted = asyncio.ensure_future(self.halt.wait())
        await asyncio.wait({task, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        return not self.halt.is_set()

    async def _room_for(self, ordinal: int, slots: asyncio.Semaphore) -> bool:
        """Wait for a place in the writer's window and an in-flight slot; False on the halt."""
        if self.halt.is_set():
            return False
        if not self.writer.has_room(ordinal) and not await self._unless_halted(
            self.writer.wait_for_room(ordinal)
        ):
            return False
        if not slots.locked():
            await slots.acquire()  # free: returns at once
            return True
        return await self._unless_halted(slots.acquire())

    async def _dispatch(self) -> set[asyncio.Task[None]]:
        """Start every record (the window and ``concurrency`` permitting) until the input ends
        or the halt; the tasks still running."""
        inflight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.concurrency)
        try:
            async with contextlib.aclosing(self._records()) as records:
                async for record in records:
                    if not await self._room_for(record.ordinal, slots):
                        break
                    task = asyncio.create_task(self._answer(record, slots))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        except Exception as error:
            self._fail(error, "reading the input failed")
        return inflight

    async def _answer(self, record: Record, slots: asyncio.Semaphore) -> None:
        try:
            line, ok = await self._line_for(record)
            self.writer.put(record.ordinal, (line, ok))
        except Exception as error:
            self._fail(error, f"record {record.number} of {self.settings.input_uri} failed")
        finally:
            slots.release()

    async def _line_for(self, record: Record) -> tuple[bytes, bool]:
        request = parse_line(record.line)
        if isinstance(request, BadLine):
            return error_line(record.number, request), False
        status, body = await self.respond(request.url, with_seed(request))
        line = response_line(record.number, request.custom_id, status, body)
        return line, status < HTTP_ERROR

    async def _drain(self, inflight: set[asyncio.Task[None]]) -> None:
        """Let the in-flight records finish: all of them when the input ended, until the grace
        deadline after a stop, none after a failure. Unfinished ones are cancelled (a later
        attempt redoes them)."""
        pending = set(inflight)
        while pending and self.failure is None:
            timeout = None
            if self.stopped_at is not None:
                timeout = self.stopped_at + self.grace_s - self.loop.time()
                if timeout <= 0:
                    break
            halted = None if self.halt.is_set() else asyncio.ensure_future(self.halt.wait())
            watched = pending | {halted} if halted else pending
            await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if halted is not None:
                halted.cancel()
            pending = {task for task in pending if not task.done()}
        if pending:
            log.info("%d in-flight records not finished: a later attempt redoes them", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # Writing and checkpointing.
    def _write(self, result: tuple[bytes, bool]) -> None:
        """The ordered writer's sink: the next line, into the open part."""
        line, ok = result
        if self.part is None:
            name = f"part-{self.settings.shard_index}-{self.settings.attempt}-{self.part_seq:05d}"
            self.part = self.store.part(f"{name}.jsonl")
            self.part_seq += 1
        self.part.write(line)
        if self.metrics is not None:
            self.metrics.batch_record("ok" if ok else "error")

    async def _checkpoint(self, *, complete: bool) -> None:
        """Close the open part, then write a checkpoint listing every part, then annotate the
        pod; nothing when no record finished since the last one."""
        async with self.lock:
            # Taken together, with no await between: the part holds exactly the lines of the
            # records from the previous checkpoint's next_record to this one's.
            next_record = self.writer.next
            if next_record == self.saved_next and not complete:
                return  # no record finished: no line was written either
            part, self.part = self.part, None
            if part is not None:
                try:
                    self.parts.append(await asyncio.to_thread(part.publish))
                except BaseException:
                    self.poisoned = True
                    raise
            checkpoint = Checkpoint(
                input_uri=self.settings.input_uri,
                shard=self.settings.shard,
                next_record=next_record,
                parts=tuple(self.parts),
                model=self.settings.model_name,
                attempt=self.settings.attempt,
                complete=complete,
            )
            name = checkpoint_name(self.settings.shard_index, self.number)
            await asyncio.to_thread(self.store.write_bytes, name, checkpoint.to_json())
            self.number += 1
            self.saved_next = next_record
            self.checkpoint_uri = self.store.uri_of(name)
            if self.metrics is not None:
                self.metrics.batch_checkpoint()
            self._log_progress()
            await self._note(self.checkpoint_uri)

    def _log_progress(self) -> None:
        done = self.saved_next
        total = "?" if self.total is None else str(self.total)
        elapsed = max(self.loop.time() - self.began, 1e-9)
        rate = (done - self.start) / elapsed
        log.info(
            "checkpoint %s: %d/%s records of shard %s done, %.1f records/s",
            self.checkpoint_uri,
            done,
            total,
            self.settings.shard,
            rate,
        )

    async def _note(self, uri: str) -> None:
        if self.podnote is None:
            return
        try:
            await asyncio.to_thread(self.podnote, uri)
        except Exception as error:  # the annotation is a hint; the store is the truth
            log.warning("checkpoint annotation failed: %s", error)

    async def _finish(self) -> BatchResult:
        """The last checkpoint, and the exit code it allows."""
        complete = (
            self.failure is None and self.total is not None and self.writer.next >= self.total
        )
        if complete:
            code = EXIT_COMPLETE
        elif self.failure is not None:
            code = EXIT_FAILED
        else:
            code = EXIT_STOPPED
        message = "" if self.failure is None else str(self.failure)
        if self.poisoned:
            message = message or "an output part was lost"
            code = EXIT_FAILED
        else:
            try:
                await self._checkpoint(complete=complete)
            except Exception as error:
                log.error("the final checkpoint failed: %s", error, exc_info=error)
                code, complete, message = EXIT_FAILED, False, str(error)
        return BatchResult(
            exit_code=code,
            next_record=self.saved_next,
            total=self.total,
            complete=complete and code == EXIT_COMPLETE,
            checkpoint=self.checkpoint_uri,
            written=self.saved_next - self.start,
            message=message,
        )


# -- entry points -----------------------------------------------------------------------------
def _resume(store: Store, settings: BatchSettings) -> Resume:
    resume = find_resume(store, settings.shard_index, settings.resume_from)
    if resume.checkpoint is not None and resume.uri is not None:
        verify(
            resume.checkpoint,
            resume.uri,
            store,
            settings.input_uri,
            settings.shard,
            settings.model_name,
        )
        log.info(
            "resuming shard %s from %s at record %d",
            settings.shard,
            resume.uri,
            resume.checkpoint.next_record,
        )
    return resume


async def run_batch(
    settings: BatchSettings,
    respond: Respond,
    *,
    stop: asyncio.Event,
    podnote: PodNote | None = None,
    metrics: WorkerMetrics | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    grace_s: float = DEFAULT_GRACE_S,
) -> BatchResult:
    """Run ``settings``' shard to completion or until ``stop``; never raises for a bad
    configuration (exit code 2) or a failed record (exit code 1)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    try:
        store = await asyncio.to_thread(Store, settings.output_uri)
        resume = await asyncio.to_thread(_resume, store, settings)
        done = resume.checkpoint
        if done is not None and done.complete:
            log.info("shard %s is already complete (%s)", settings.shard, resume.uri)
            return BatchResult(EXIT_COMPLETE, done.next_record, done.next_record, True, resume.uri)
        source = await asyncio.to_thread(input_files, settings.input_uri)
    except ConfigError as error:
        log.error("%s", error)
        return BatchResult(EXIT_CONFIG, message=str(error))
    except OSError as error:  # the store unreachable or refusing: a retry may do better
        log.error("cannot reach the job's storage: %s", error, exc_info=error)
        return BatchResult(EXIT_FAILED, message=str(error))
    run = _ShardRun(
        settings,
        respond,
        store,
        resume,
        source,
        podnote=podnote,
        metrics=metrics,
        concurrency=concurrency,
        grace_s=grace_s,
    )
    return await run.run(stop)


async def run_until_signalled(
    settings: BatchSettings,
    respond: Respond,
    *,
    podnote: PodNote | None = None,
    metrics: WorkerMetrics | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    grace_s: float = DEFAULT_GRACE_S,
) -> BatchResult:
    """:func:`run_batch` in the running loop, stopped by SIGTERM or SIGINT. ``podnote`` None
    annotates the pod the settings name (TIDAL_POD_NAME/TIDAL_POD_NAMESPACE)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    note = podnote or podnotes.for_pod(settings.pod_name, settings.pod_namespace)
    try:
        return await run_batch(
            settings,
            respond,
            stop=stop,
            podnote=note,
            metrics=metrics,
            concurrency=concurrency,
            grace_s=grace_s,
        )
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(
    respond: Respond,
    *,
    env: Mapping[str, str] | None = None,
    podnote: PodNote | None = None,
    metrics: WorkerMetrics | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    grace_s: float = DEFAULT_GRACE_S,
) -> int:
    """Read the settings from ``env`` (default: the process's), run the shard until done or
    signalled, and return the process's exit code."""
    try:
        settings = BatchSettings.from_env(os.environ if env is None else env)
    except ValueError as error:
        log.error("%s", error)
        return EXIT_CONFIG
    result = asyncio.run(
        run_until_signalled(
            settings,
            respond,
            podnote=podnote,
            metrics=metrics,
            concurrency=concurrency,
            grace_s=grace_s,
        )
    )
    return result.exit_code

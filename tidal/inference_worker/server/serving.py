"""One completion request against an :class:`EngineClient`: validate, tokenize, fit the
context, generate, and answer whole (:func:`complete`, which the batch runner calls too) or as
server-sent events (:func:`open_stream`).

The engine's iterator is always closed when we stop reading it, however we stop (an error, a
client that went away, the task cancelled): closing it early is how the engine learns to abort
the sequence and free its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tidal.inference_worker.engine.params import (
    EngineClient,
    EngineDeadError,
    EngineDrainingError,
    RequestOutput,
    SamplingParams,
)
from tidal.inference_worker.server import sse
from tidal.inference_worker.server.protocol import (
    ChatPrompt,
    Kind,
    Prompt,
    Reply,
    RequestError,
    bad_request,
    check_model,
    fit_max_tokens,
    new_request_id,
    parse_request,
    prompt_param,
    reply_finish_reason,
    usage,
)

log = logging.getLogger(__name__)

# Tokenizing a long prompt or rendering a chat template takes milliseconds to seconds of CPU:
# off the event loop, so streams keep flowing, and on one thread, because a tokenizer is not
# guaranteed to be safe to call from several at once (vLLM serializes it too).
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine: its prompt ids and a completion budget that fits."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool
    reply: Reply


def engine_busy(message: str) -> RequestError:
    return RequestError(503, message, None, "ServiceUnavailableError")


def engine_dead(error: EngineDeadError) -> RequestError:
    return RequestError(500, f"the engine died: {error}", None, "InternalServerError")


ABORTED = "the request was aborted before it finished (the server is shutting down)"


# ---------------------------------------------------------------------------- tokenizing


def _vocab_size(engine: EngineClient) -> int | None:
    size = getattr(engine.tokenizer, "vocab_size", None)  # not in the contract: optional
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_token_ids(ids: tuple[int, ...], vocab_size: int | None) -> None:
    for position, token in enumerate(ids):
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise bad_request("prompt", f"token id {token} at {position} is not in {bound}")


def _encode(engine: EngineClient, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as error:  # text the tokenizer refuses (a lone surrogate) is the input's
        raise bad_request(param, f"the text could not be tokenized: {error}") from error


def _render_chat(engine: EngineClient, chat: ChatPrompt) -> list[int]:
    try:
        text = engine.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True)
    except Exception as error:  # the template is the checkpoint's code: any error is the input's
        raise bad_request("messages", f"the chat template failed: {error}") from error
    # The template writes BOS itself where the model wants one.
    return _encode(engine, text, False, "messages")


def tokenize(engine: EngineClient, prompt: Prompt) -> tuple[int, ...]:
    """The prompt's token ids (blocking: call it off the event loop)."""
    if isinstance(prompt, ChatPrompt):
        return tuple(_render_chat(engine, prompt))
    if isinstance(prompt, str):
        return tuple(_encode(engine, prompt, True, "prompt"))  # with BOS, as vLLM
    _check_token_ids(prompt, _vocab_size(engine))
    return prompt


# ---------------------------------------------------------------------------- preparing


async def prepare(engine: EngineClient, kind: Kind, body: Any) -> Prepared:
    """Validate and tokenize a request body; raises :class:`RequestError`."""
    request = parse_request(kind, body)
    check_model(request.model, engine.model_name)
    loop = asyncio.get_running_loop()
    prompt_ids = await loop.run_in_executor(_TOKENIZER_THREAD, tokenize, engine, request.prompt)
    if not prompt_ids:
        raise bad_request(prompt_param(kind), "the prompt is empty (no tokens)")
    budget = fit_max_tokens(len(prompt_ids), request.params.max_tokens, engine.max_model_len, kind)
    reply = Reply(
        kind, new_request_id(kind), int(time.time()), engine.model_name, request.include_usage
    )
    return Prepared(
        request_id=reply.request_id,
        prompt_ids=prompt_ids,
        params=replace(request.params, max_tokens=budget),
        stream=request.stream,
        reply=reply,
    )


async def _close(outputs: AsyncIterator[RequestOutput] | None) -> None:
    """Close the engine's iterator (an early close aborts the request in the engine)."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()


# ---------------------------------------------------------------------------- whole answers


async def answer(engine: EngineClient, prepared: Prepared) -> Answer:
    """Generate and answer whole: (200, response) or (503, error) when the engine is draining
    or aborted the request. :class:`EngineDeadError` propagates."""
    outputs: AsyncIterator[RequestOutput] | None = None
    pieces: list[str] = []
    last: RequestOutput | None = None
    try:
        outputs = engine.generate(prepared.request_id, prepared.prompt_ids, prepared.params)
        async for output in outputs:
            if last is not None and last.finished:
                continue  # nothing follows the last output (the contract); ignore it if it does
            pieces.append(output.text)
            last = output
    except EngineDrainingError as error:
        busy = engine_busy(f"the engine is not admitting requests: {error}")
        return busy.status, busy.body()
    finally:
        await _close(outputs)
    if last is None or not last.finished or last.finish_reason == "abort":
        aborted = engine_busy(ABORTED)
        return aborted.status, aborted.body()
    used = usage(last.prompt_tokens, last.completion_tokens)
    return 200, prepared.reply.body("".join(pieces), reply_finish_reason(last.finish_reason), used)


async def complete(engine: EngineClient, kind: Kind, body: Any) -> Answer:
    """Answer one request body whole, as (HTTP status, response or error body); a body that
    asks to stream is answered whole too. Never raises for a bad body; a 503 means the engine
    is draining or aborted the request (try again elsewhere, the request was not at fault).
    :class:`EngineDeadError` propagates."""
    try:
        prepared = await prepare(engine, kind, body)
    except RequestError as error:
        return error.status, error.body()
    return await answer(engine, prepared)


# ---------------------------------------------------------------------------- streams


async def open_stream(
    engine: EngineClient,
    prepared: Prepared,
    on_dead: Callable[[EngineDeadError], None] | None = None,
) -> Answer | AsyncGenerator[bytes, None]:
    """Start generating and wait for the first output, so a draining engine is still a plain
    503 answer; then the stream's events. ``on_dead`` hears of an engine that dies mid-stream
    (the stream ends with an error event). :class:`EngineDeadError` before the first output
    propagates."""
    outputs: AsyncIterator[RequestOutput] | None = None
    try:
        outputs = engine.generate(prepared.request_id, prepared.prompt_ids, prepared.params)
        first = await anext(outputs)
    except EngineDrainingError as error:
        await _close(outputs)
        busy = engine_busy(f"the engine is not admitting requests: {error}")
        return busy.status, busy.body()
    except StopAsyncIteration:
        aborted = engine_busy(ABORTED)
        return aborted.status, aborted.body()
    except BaseException:
        await _close(outputs)
        raise
    return _events(prepared.reply, outputs, first, on_dead)


def _error_event(error: RequestError) -> bytes:
    return sse.event(error.body())


def aborted_events() -> bytes:
    """How a stream aborted at shutdown ends: an error event, then [DONE]."""
    return _error_event(engine_busy(ABORTED)) + sse.DONE


async def _events(
    reply: Reply,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    on_dead: Callable[[EngineDeadError], None] | None,
) -> AsyncGenerator[bytes, None]:
    """The stream's events; errors after the first byte can only be events (as vLLM)."""
    try:
        if reply.kind == "chat":
            yield sse.event(reply.role_chunk())
        last = first
        if chunk := _output_chunk(reply, first):
            yield chunk
        async for output in outputs:
            if last.finished:
                continue  # nothing follows the last output (the contract)
            last = output
            if chunk := _output_chunk(reply, output):
                yield chunk
        if not last.finished or last.finish_reason == "abort":
            yield _error_event(engine_busy(ABORTED))
        elif reply.include_usage:
            yield sse.event(reply.usage_chunk(usage(last.prompt_tokens, last.completion_tokens)))
        yield sse.DONE
    except EngineDeadError as error:
        if on_dead is not None:
            on_dead(error)
        log.error("the engine died during stream %s: %s", reply.request_id, error)
        yield _error_event(engine_dead(error))
        yield sse.DONE
    except EngineDrainingError as error:
        yield _error_event(engine_busy(f"the engine stopped: {error}"))
        yield sse.DONE
    finally:
        await _close(outputs)


def _output_chunk(reply: Reply, output: RequestOutput) -> bytes | None:
    """One output's event; outputs with no text (held back for a stop string, half a UTF-8
    character) send nothing until the last. The last carries the finish reason, and an
    aborted request's last output gets none (the error event follows)."""
    if output.finished and output.finish_reason != "abort":
        return sse.event(reply.delta_chunk(output.text, reply_finish_reason(output.finish_reason)))
    if output.text and not output.finished:
        return sse.event(reply.delta_chunk(output.text))
    return None

"""The worker's OpenAI-compatible server against a fake engine: validation, the context check,
whole and streamed answers, readiness and draining, client disconnects, and a real uvicorn
process drained by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from starlette.testclient import TestClient

from tidal.inference_worker.engine.params import (
    EngineDeadError,
    EngineDrainingError,
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenizerLike,
)
from tidal.inference_worker.metrics import WorkerMetrics
from tidal.inference_worker.server import protocol
from tidal.inference_worker.server.app import ServerState, build_app, drain_budget, serve
from tidal.inference_worker.server.serving import complete

MODEL = "fake-model"
REPLY = "Hello, world! How are you today?"  # 32 characters, one token each
BOS = 1
REPO = Path(__file__).resolve().parent.parent


class FakeTokenizer:
    """One token per character (its code point), BOS first when special tokens are added."""

    eos_token_ids: tuple[int, ...] = (2,)
    vocab_size = 0x110000

    def __init__(self) -> None:
        self.encoded: list[tuple[str, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append((text, add_special_tokens))
        if any(0xD800 <= ord(c) < 0xE000 for c in text):  # as the tokenizers library refuses
            raise TypeError("TextInputSequence must be str")
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i > 2)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        if any(m["content"] == "break the template" for m in messages):
            raise ValueError("template says no")
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Streams ``reply`` one character an output, honouring max_tokens and stop strings, and
    records how each request ended: finished, or closed early (an abort)."""

    def __init__(
        self,
        reply: str = REPLY,
        max_model_len: int = 64,
        delay_s: float = 0.0,
        die_after: int | None = None,
        abort_after: int | None = None,
        report: bool = False,
    ) -> None:
        self.model_name = MODEL
        self.max_model_len = max_model_len
        self.fake_tokenizer = FakeTokenizer()
        self.tokenizer: TokenizerLike = self.fake_tokenizer
        self.reply = reply
        self.delay_s = delay_s
        self.die_after = die_after
        self.abort_after = abort_after
        self.report = report  # print how requests end (for the subprocess test)
        self.ready = True
        self.draining = False
        self.started: list[tuple[str, tuple[int, ...], SamplingParams]] = []
        self.finished: list[str] = []
        self.closed_early: list[str] = []

    def is_ready(self) -> bool:
        return self.ready

    def _completion(self, params: SamplingParams) -> tuple[str, FinishReason]:
        text = self.reply
        reason: FinishReason = "stop"
        for stop in params.stop:
            if stop in text:
                text = text[: text.index(stop)]
        if params.max_tokens is not None and len(text) > params.max_tokens:
            text, reason = text[: params.max_tokens], "length"
        return text, reason

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.started.append((request_id, tuple(prompt_ids), params))
        if self.draining:
            raise EngineDrainingError("draining")
        text, reason = self._completion(params)
        done = False
        try:
            for count, output in enumerate(
                self._outputs(request_id, len(prompt_ids), text, reason)
            ):
                if self.die_after is not None and count == self.die_after:
                    raise EngineDeadError("rank 1 exited")
                await asyncio.sleep(self.delay_s)
                yield output
            done = True
            self.finished.append(request_id)
        finally:
            if not done:
                self.closed_early.append(request_id)
                if self.report:
                    print(f"fake engine: {request_id} closed early", file=sys.stderr, flush=True)

    def _outputs(
        self, request_id: str, prompt_tokens: int, text: str, reason: FinishReason
    ) -> list[RequestOutput]:
        if self.abort_after is not None:
            text, reason = text[: self.abort_after], "abort"
        pieces = list(text) or [""]
        return [
            RequestOutput(
                request_id,
                piece,
                (ord(piece),) if piece else (),
                prompt_tokens,
                len(text[: i + 1]),
                finished=i == len(pieces) - 1,
                finish_reason=reason if i == len(pieces) - 1 else None,
            )
            for i, piece in enumerate(pieces)
        ]


def make_client(
    engine: FakeEngine | None = None, state: ServerState | None = None, **app: Any
) -> tuple[TestClient, ServerState]:
    state = state if state is not None else ServerState()
    return TestClient(build_app(engine, WorkerMetrics(MODEL), state, **app)), state


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
BASE: dict[str, dict[str, Any]] = {
    "completions": {"model": MODEL, "prompt": "hi"},
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
}
PATHS = {"completions": COMPLETIONS, "chat": CHAT}


def events(response: httpx2.Response) -> list[Any]:
    """The SSE frames' payloads, "[DONE]" as a string; every frame is ``data: ...``."""
    raw = response.read().decode()
    assert raw.endswith("\n\n"), raw
    payloads: list[Any] = []
    for frame in raw.split("\n\n")[:-1]:
        assert frame.startswith("data: "), frame
        data = frame[len("data: ") :]
        payloads.append(data if data == "[DONE]" else orjson.loads(data))
    return payloads


# ---------------------------------------------------------------------------- validation

BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": [True]}, "prompt"),
    ("completions", {"prompt": [-1]}, "prompt"),
    ("completions", {"prompt": [0x110000]}, "prompt"),
    ("completions", {"max_tokens": "5"}, "max_tokens"),
    ("completions", {"max_tokens": 1.5}, "max_tokens"),
    ("completions", {"max_tokens": True}, "max_tokens"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"temperature": -0.5}, "temperature"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"top_k": -2}, "top_k"),
    ("completions", {"top_k": 2.5}, "top_k"),
    ("completions", {"stop": 3}, "stop"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"stop": [""]}, "stop"),
    ("completions", {"stop_token_ids": ["a"]}, "stop_token_ids"),
    ("completions", {"seed": 2**64}, "seed"),
    ("completions", {"seed": "7"}, "seed"),
    ("completions", {"n": 2}, "n"),
    ("completions", {"n": "1"}, "n"),
    ("completions", {"stream": "yes"}, "stream"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"stream": True, "stream_options": []}, "stream_options"),
    (
        "completions",
        {"stream": True, "stream_options": {"include_usage": "y"}},
        "stream_options.include_usage",
    ),
    (
        "completions",
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
        "stream_options.continuous_usage_stats",
    ),
    ("completions", {"ignore_eos": 1}, "ignore_eos"),
    ("completions", {"user": 5}, "user"),
    ("completions", {"model": 5}, "model"),
    ("completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("completions", {"presence_penalty": 1}, "presence_penalty"),
    ("completions", {"logit_bias": {"5": 1}}, "logit_bias"),
    ("completions", {"logprobs": 3}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"bogus": 1}, "bogus"),
    ("completions", {"max_completion_tokens": 5}, "max_completion_tokens"),
    ("completions", {"messages": []}, "messages"),
    ("chat", {"messages": None}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": ["hi"]}, "messages[0]"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
        "messages[0].content[0].text",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "messages[0].tool_calls",
    ),
    ("chat", {"messages": [{"role": "user", "content": "break the template"}]}, "messages"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"max_tokens": "lots"}, "max_tokens"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"prompt": "x"}, "prompt"),
    ("chat", {"tools": []}, "tools"),
]


@pytest.mark.parametrize(("kind", "patch", "param"), BAD_FIELDS)
def test_a_bad_field_is_a_400_naming_it(kind: str, patch: dict[str, Any], param: str) -> None:
    engine = FakeEngine()
    client, state = make_client(engine)
    response = client.post(PATHS[kind], json=BASE[kind] | patch)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["code"] == 400
    assert error["message"]
    assert engine.started == []
    assert state.in_flight == 0


def test_a_wrong_type_names_the_expected_type() -> None:
    client, _ = make_client(FakeEngine())
    error = client.post(COMPLETIONS, json=BASE["completions"] | {"max_tokens": "5"}).json()
    assert error["error"]["message"] == "'max_tokens' must be an integer, got string"


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    client, _ = make_client(FakeEngine())
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
               "logprobs": None, "echo": False, "best_of": 1, "suffix": None, "n": 1,
               "user": "someone", "stream": False}  # fmt: skip
    response = client.post(COMPLETIONS, json=BASE["completions"] | neutral)
    assert response.status_code == 200, response.text
    chat_neutral = {"logprobs": False, "top_logprobs": 0, "repetition_penalty": 1}
    assert client.post(CHAT, json=BASE["chat"] | chat_neutral).status_code == 200


def test_sampling_fields_reach_the_engine() -> None:
    engine = FakeEngine()
    client, _ = make_client(engine)
    body = BASE["completions"] | {"temperature": 0, "top_p": 0.5, "top_k": -1, "stop": "x",
                                  "seed": 7, "ignore_eos": True, "max_tokens": 5,
                                  "stop_token_ids": [9]}  # fmt: skip
    assert client.post(COMPLETIONS, json=body).status_code == 200
    params = engine.started[0][2]
    assert params == SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, top_k=0, seed=7,
                                    stop=("x",), stop_token_ids=(9,), ignore_eos=True)  # fmt: skip


def test_defaults_follow_openai_and_vllm() -> None:
    engine = FakeEngine()
    client, _ = make_client(engine)
    client.post(COMPLETIONS, json={"prompt": "hi"})  # no model: the served one
    client.post(CHAT, json=BASE["chat"])
    client.post(CHAT, json=BASE["chat"] | {"max_tokens": 3, "max_completion_tokens": 4})
    completions, chat, both = (started[2] for started in engine.started)
    assert completions.max_tokens == 16 and completions.temperature == 1.0
    prompt_tokens = len("<user>hi<assistant>")
    assert chat.max_tokens == 64 - prompt_tokens  # the rest of the context
    assert both.max_tokens == 4  # max_completion_tokens wins


def test_an_unknown_model_is_a_404() -> None:
    client, _ = make_client(FakeEngine())
    response = client.post(COMPLETIONS, json=BASE["completions"] | {"model": "gpt-5"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The model `gpt-5` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


# ---------------------------------------------------------------------------- context length


def test_a_prompt_and_completion_beyond_the_context_is_a_400() -> None:
    engine = FakeEngine(max_model_len=64)
    client, _ = make_client(engine)
    body = {"prompt": "a" * 40, "max_tokens": 30}  # 41 tokens with BOS
    error = client.post(COMPLETIONS, json=body).json()["error"]
    assert error["param"] == "prompt"
    assert error["message"] == (
        "This model's maximum context length is 64 tokens. However, you requested 71 tokens "
        "(41 in the messages, 30 in the completion). Please reduce the length of the messages "
        "or completion."
    )
    chat = {"messages": [{"role": "user", "content": "a" * 40}], "max_tokens": 30}
    response = client.post(CHAT, json=chat)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert engine.started == []


def test_a_prompt_that_fills_the_context_alone_is_a_400() -> None:
    client, _ = make_client(FakeEngine(max_model_len=64))
    response = client.post(COMPLETIONS, json={"prompt": "a" * 63, "max_tokens": None})
    assert response.status_code == 400
    assert "your request has 64 input tokens" in response.json()["error"]["message"]


def test_exactly_full_context_is_accepted_and_null_max_tokens_fills_it() -> None:
    engine = FakeEngine(max_model_len=64)
    client, _ = make_client(engine)
    assert client.post(COMPLETIONS, json={"prompt": "a" * 40, "max_tokens": 23}).status_code == 200
    assert (
        client.post(COMPLETIONS, json={"prompt": "a" * 40, "max_tokens": None}).status_code == 200
    )
    assert engine.started[1][2].max_tokens == 23


def test_the_pure_length_check() -> None:
    assert protocol.fit_max_tokens(10, None, 64, "chat") == 54
    assert protocol.fit_max_tokens(10, 54, 64, "chat") == 54
    with pytest.raises(protocol.RequestError) as raised:
        protocol.fit_max_tokens(10, 55, 64, "chat")
    assert raised.value.param == "messages"


# ---------------------------------------------------------------------------- whole answers


def test_a_completion_answer() -> None:
    engine = FakeEngine()
    client, state = make_client(engine)
    before = int(time.time())
    body = client.post(COMPLETIONS, json=BASE["completions"]).json()
    assert body["id"].startswith("cmpl-") and len(body["id"]) > len("cmpl-") + 16
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert before <= body["created"] <= time.time()
    assert body["choices"] == [
        {"index": 0, "text": REPLY[:16], "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    assert engine.started[0][1] == (BOS, ord("h"), ord("i"))
    assert engine.finished == [engine.started[0][0]] and engine.closed_early == []
    assert engine.started[0][0] != client.post(COMPLETIONS, json=BASE["completions"]).json()["id"]
    assert state.in_flight == 0


def test_token_id_prompts_are_used_as_given() -> None:
    engine = FakeEngine()
    client, _ = make_client(engine)
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        assert client.post(COMPLETIONS, json={"prompt": prompt}).status_code == 200
    assert [started[1] for started in engine.started] == [(5, 6, 7), (5, 6, 7)]
    assert client.post(COMPLETIONS, json={"prompt": ["hi"]}).status_code == 200
    assert engine.started[2][1] == (BOS, ord("h"), ord("i"))


def test_a_chat_answer() -> None:
    engine = FakeEngine(max_model_len=128)
    client, _ = make_client(engine)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    body = client.post(CHAT, json={"model": MODEL, "messages": messages}).json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REPLY},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    rendered = "<system>be brief<user>a\nb<assistant>"
    assert engine.fake_tokenizer.encoded == [(rendered, False)]  # the template wrote any BOS
    assert body["usage"]["prompt_tokens"] == len(rendered)
    assert body["usage"]["completion_tokens"] == len(REPLY)


def test_stop_strings_end_the_answer_with_stop() -> None:
    client, _ = make_client(FakeEngine())
    body = client.post(CHAT, json=BASE["chat"] | {"stop": [","]}).json()
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_complete_is_the_batch_runners_entry_and_never_raises_for_a_bad_body() -> None:
    engine = FakeEngine()
    bodies: list[Any] = [None, [], "x", {"prompt": 5}, {"model": "other", "prompt": "x"},
                         {"prompt": "lone \ud800 surrogate"}]  # fmt: skip
    for body in bodies:
        status, answer = asyncio.run(complete(engine, "completions", body))
        assert status in (400, 404)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    status, answer = asyncio.run(complete(engine, "chat", BASE["chat"] | {"stream": True}))
    assert status == 200 and answer["choices"][0]["message"]["content"] == REPLY
    engine.draining = True
    status, answer = asyncio.run(complete(engine, "chat", BASE["chat"]))
    assert status == 503
    dead = FakeEngine(die_after=2)
    with pytest.raises(EngineDeadError):
        asyncio.run(complete(dead, "chat", BASE["chat"]))
    assert dead.closed_early == [dead.started[0][0]]


# ---------------------------------------------------------------------------- streams


def stream(
    client: TestClient, path: str, body: dict[str, Any]
) -> tuple[httpx2.Response, list[Any]]:
    with client.stream("POST", path, json=body | {"stream": True}) as response:
        return response, events(response)


def test_a_chat_stream() -> None:
    engine = FakeEngine()
    client, state = make_client(engine)
    response, frames = stream(client, CHAT, BASE["chat"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert all("usage" not in c for c in chunks)
    assert engine.closed_early == [] and state.in_flight == 0


def test_a_completions_stream_with_usage() -> None:
    client, _ = make_client(FakeEngine())
    body = BASE["completions"] | {"max_tokens": 5, "stream_options": {"include_usage": True}}
    _, frames = stream(client, COMPLETIONS, body)
    assert frames[-1] == "[DONE]"
    *choices, usage = frames[:-1]
    assert usage["choices"] == [] and usage["object"] == "text_completion"
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert all(c["usage"] is None for c in choices)
    assert "".join(c["choices"][0]["text"] for c in choices) == REPLY[:5]
    assert choices[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in choices} == {"text_completion"}


def test_a_stream_whose_engine_dies_ends_with_an_error_event_and_health_fails() -> None:
    engine = FakeEngine(die_after=3)
    client, state = make_client(engine)
    _, frames = stream(client, CHAT, BASE["chat"])
    assert frames[-1] == "[DONE]"
    assert frames[-2]["error"]["type"] == "InternalServerError"
    assert engine.closed_early == [engine.started[0][0]]
    assert client.get("/health").status_code == 503
    assert state.in_flight == 0


def test_an_aborted_request_gets_no_reply() -> None:
    engine = FakeEngine(abort_after=3)
    client, _ = make_client(engine)
    response = client.post(CHAT, json=BASE["chat"])
    assert response.status_code == 503
    _, frames = stream(client, CHAT, BASE["chat"])
    finishes = [c["choices"][0]["finish_reason"] for c in frames if "choices" in c]
    assert "abort" not in finishes and "stop" not in finishes
    assert frames[-2]["error"]["code"] == 503


def test_validation_errors_of_streams_are_plain_answers() -> None:
    client, _ = make_client(FakeEngine())
    response = client.post(CHAT, json=BASE["chat"] | {"stream": True, "n": 3})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


# ---------------------------------------------------------------------------- readiness


def test_loading_answers_503_until_the_engine_arrives() -> None:
    client, state = make_client(None)
    health = client.get("/health")
    assert health.status_code == 503 and health.text == "loading"
    response = client.post(COMPLETIONS, json=BASE["completions"])
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert client.get("/v1/models").status_code == 503
    state.engine = FakeEngine()
    assert client.get("/health").status_code == 200
    assert client.get("/health").content == b""
    assert client.post(COMPLETIONS, json=BASE["completions"]).status_code == 200


def test_health_follows_the_engine_and_draining() -> None:
    engine = FakeEngine()
    client, state = make_client(engine)
    assert client.get("/health").status_code == 200
    engine.ready = False
    assert client.get("/health").status_code == 503
    assert client.post(CHAT, json=BASE["chat"]).status_code == 503
    engine.ready = True
    state.draining = True
    health = client.get("/health")
    assert health.status_code == 503 and health.text == "draining"
    response = client.post(CHAT, json=BASE["chat"])
    assert response.status_code == 503
    assert response.headers["connection"] == "close"
    assert engine.started == []


def test_an_engine_that_stopped_admitting_is_a_503() -> None:
    engine = FakeEngine()
    engine.draining = True
    client, state = make_client(engine)
    assert client.post(COMPLETIONS, json=BASE["completions"]).status_code == 503
    response = client.post(COMPLETIONS, json=BASE["completions"] | {"stream": True})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert state.in_flight == 0


def test_a_dead_engine_is_a_500_and_health_then_fails() -> None:
    engine = FakeEngine(die_after=0)
    client, _ = make_client(engine)
    response = client.post(COMPLETIONS, json=BASE["completions"])
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "InternalServerError"
    assert client.get("/health").text == "engine dead"
    assert client.post(COMPLETIONS, json=BASE["completions"]).status_code == 500
    assert len(engine.started) == 1  # refused without asking the engine


def test_models_and_metrics() -> None:
    client, _ = make_client(FakeEngine())
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "tidal"
    assert card["max_model_len"] == 64 and isinstance(card["created"], int)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "tidal_time_to_first_token_seconds_bucket" in metrics.text
    assert "tidal_num_requests_running" in metrics.text


# ---------------------------------------------------------------------------- bodies


def test_malformed_json_and_non_objects_are_400() -> None:
    client, _ = make_client(FakeEngine())
    response = client.post(COMPLETIONS, content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("invalid JSON: ")
    response = client.post(CHAT, content=b"[1, 2]")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"


def test_an_oversized_body_is_a_413() -> None:
    client, state = make_client(FakeEngine(), max_body_bytes=1000)
    big = orjson.dumps({"prompt": "a" * 2000})
    assert client.post(COMPLETIONS, content=big).status_code == 413
    chunked = client.post(COMPLETIONS, content=iter([big[:900], big[900:]]))  # no length
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == 413
    assert state.in_flight == 0


# ---------------------------------------------------------------------------- disconnects


async def call_disconnecting(
    app: Any,
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    after_chunks: int | None,
    after_s: float = 0.0,
    stuck_send: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Drive the ASGI app as uvicorn does, the client leaving after ``after_chunks`` body
    chunks of the answer (or ``after_s`` seconds when None); ``stuck_send``: the last send
    blocks (a full socket), so the stream is cancelled while its generator waits at a yield.
    Returns what was sent and the requests the engine saw closed by the time the app
    returned (before the loop's own clean-up of unfinished generators could close them)."""
    payload = orjson.dumps(body)
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            if after_chunks is None:
                asyncio.get_running_loop().call_later(after_s, gone.set)
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if after_chunks is not None and len(chunks) >= after_chunks:
            gone.set()
            if stuck_send:
                await asyncio.sleep(1)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent, list(engine.closed_early)


@pytest.mark.parametrize("stuck_send", [False, True])
@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_stream_whose_client_leaves_closes_the_engine_iterator(
    kind: str, stuck_send: bool
) -> None:
    engine = FakeEngine(delay_s=0.02)
    state = ServerState()
    app = build_app(engine, WorkerMetrics(MODEL), state)
    body = BASE[kind] | {"stream": True, "max_tokens": 30}
    sent, closed = asyncio.run(
        call_disconnecting(app, engine, PATHS[kind], body, after_chunks=2, stuck_send=stuck_send)
    )
    request_id = engine.started[0][0]
    assert closed == [request_id]
    assert engine.finished == []
    body_chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(body_chunks) < 10  # it stopped, it did not stream all 30 tokens
    assert state.in_flight == 0


def test_a_whole_answer_whose_client_leaves_closes_the_engine_iterator() -> None:
    engine = FakeEngine(delay_s=0.02)
    state = ServerState()
    app = build_app(engine, WorkerMetrics(MODEL), state)
    body = BASE["chat"] | {"max_tokens": 30}
    started = time.monotonic()
    _, closed = asyncio.run(
        call_disconnecting(app, engine, CHAT, body, after_chunks=None, after_s=0.1)
    )
    assert time.monotonic() - started < 0.5  # 30 tokens would take 0.6 s
    assert closed == [engine.started[0][0]]
    assert state.in_flight == 0


# ---------------------------------------------------------------------------- uvicorn, SIGTERM


def test_a_failed_load_stops_the_server_with_status_1() -> None:
    def load() -> FakeEngine:
        raise FileNotFoundError("no checkpoint at /models/x")

    codes: list[int] = []
    args = (load, WorkerMetrics(MODEL), "127.0.0.1", free_port(), 5)
    thread = threading.Thread(target=lambda: codes.append(serve(*args)))
    thread.start()
    thread.join(10)
    assert codes == [1]


def test_the_drain_budget_keeps_a_margin() -> None:
    assert drain_budget(30) == 28
    assert drain_budget(2) == 1
    assert drain_budget(0) == 0


def serve_fake(port: int, grace_s: float, delay_s: float) -> int:
    """The subprocess's entry: the real server on a fake engine that takes a while to load."""

    def load() -> FakeEngine:
        time.sleep(0.5)
        return FakeEngine(reply="x" * 40, max_model_len=256, delay_s=delay_s, report=True)

    return serve(load, WorkerMetrics(MODEL), "127.0.0.1", port, grace_s)


ENTRY = (
    "import sys; from tests.test_worker_server import serve_fake; "
    "sys.exit(serve_fake(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    tmp_path: Path, grace_s: float, delay_s: float
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:  # the child keeps its own copy
        process = subprocess.Popen(
            [sys.executable, "-c", ENTRY, str(port), str(grace_s), str(delay_s)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return process, f"http://127.0.0.1:{port}", log


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> list[int]:
    """Poll /health until 200; the statuses seen on the way."""
    seen: list[int] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        with contextlib.suppress(httpx2.TransportError):
            seen.append(httpx2.get(f"{url}/health", timeout=1).status_code)
        if seen and seen[-1] == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never ready: {log.read_text()}")


def stream_in_thread(url: str) -> tuple[threading.Thread, threading.Event, dict[str, Any]]:
    first = threading.Event()
    result: dict[str, Any] = {"lines": []}

    def run() -> None:
        body = {"prompt": "go", "max_tokens": 40, "stream": True}
        try:
            with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as response:
                result["status"] = response.status_code
                for line in response.iter_lines():
                    if line:
                        result["lines"].append(line)
                        first.set()
        except httpx2.HTTPError as error:
            result["error"] = error
        first.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, first, result


def wait_status(url: str, path: str, expected: int) -> int:
    deadline = time.monotonic() + 3
    status = 0
    while time.monotonic() < deadline:
        if path == "/health":
            status = httpx2.get(f"{url}{path}", timeout=2).status_code
        else:
            status = httpx2.post(f"{url}{path}", json={"prompt": "x"}, timeout=2).status_code
        if status == expected:
            break
        time.sleep(0.05)
    return status


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path: Path) -> None:
    process, url, log = start_server(tmp_path, grace_s=8, delay_s=0.05)  # 40 tokens: 2 s
    try:
        seen = wait_ready(process, url, log)
        assert 503 in seen  # bound while the engine loaded
        thread, first, result = stream_in_thread(url)
        assert first.wait(10)
        os.kill(process.pid, signal.SIGTERM)
        assert wait_status(url, "/health", 503) == 503
        assert wait_status(url, COMPLETIONS, 503) == 503
        thread.join(10)
        assert result.get("status") == 200 and "error" not in result, result
        assert result["lines"][-1] == "data: [DONE]"
        chunks = [orjson.loads(line[len("data: ") :]) for line in result["lines"][:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "x" * 40
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "draining 1 requests" in text and "exit 0" in text
    assert "closed early" not in text


def test_sigterm_aborts_what_outlives_the_grace_period(tmp_path: Path) -> None:
    process, url, log = start_server(tmp_path, grace_s=2, delay_s=0.25)  # 40 tokens: 10 s
    try:
        wait_ready(process, url, log)
        thread, first, result = stream_in_thread(url)
        assert first.wait(10)
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - signalled < 2 + 1  # within the grace period (and a tick)
        thread.join(10)
        assert result.get("status") == 200 and "error" not in result, result
        assert result["lines"][-1] == "data: [DONE]"
        assert orjson.loads(result["lines"][-2][len("data: ") :])["error"]["code"] == 503
        assert len(result["lines"]) < 20  # it did not stream all 40 tokens
    finally:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "aborting 1 requests" in text and "closed early" in text

"""OpenAI's completions and chat completions, as vLLM serves them (pure: no HTTP, no I/O).

:func:`parse_request` turns a request body into a :class:`ParsedRequest` or raises
:class:`RequestError` naming the offending field; :func:`fit_max_tokens` is the context length
check; :class:`Reply` builds the response bodies and stream chunks.

Stricter than vLLM in one way: an unknown field is refused (vLLM logs and ignores it), so a
client that relies on a feature we lack hears so. A few fields are accepted only at the value
that means "off" (:data:`NEUTRAL_ONLY`), because clients send them by default.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tidal.inference_worker.engine.params import FinishReason, SamplingParams

Kind = Literal["completions", "chat"]
ChatMessage = dict[str, str]

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's seed range (a torch.long)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
STREAM_OPTIONS_FIELDS = frozenset({"include_usage"})

SAMPLING_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed",
     "n", "stream", "stream_options", "ignore_eos", "user"}
)  # fmt: skip
COMPLETIONS_FIELDS = SAMPLING_FIELDS | {"prompt"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _null_or(accepts: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or accepts(value)


# Fields accepted (and ignored) only at their "off" value: OpenAI's SDKs and tools send them.
NEUTRAL_ONLY: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "frequency_penalty": ("0", _null_or(lambda v: _is_number(v) and v == 0)),
    "presence_penalty": ("0", _null_or(lambda v: _is_number(v) and v == 0)),
    "repetition_penalty": ("1", _null_or(lambda v: _is_number(v) and v == 1)),
    "logit_bias": ("null or {}", _null_or(lambda v: v == {})),
    "logprobs": ("null or false", _null_or(lambda v: v is False)),
}
COMPLETIONS_NEUTRAL_ONLY: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "echo": ("false", _null_or(lambda v: v is False)),
    "best_of": ("1", _null_or(lambda v: _is_number(v) and v == 1)),
    "suffix": ("null", lambda v: v is None),
}
CHAT_NEUTRAL_ONLY: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "top_logprobs": ("0", _null_or(lambda v: _is_number(v) and v == 0)),
}


class RequestError(Exception):
    """A request we refuse, as OpenAI reports it; ``code`` is the HTTP status, as in vLLM."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(param: str, message: str) -> RequestError:
    return RequestError(400, message, param)


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages, each ``{"role", "content"}`` (and ``name``), content parts joined."""

    messages: tuple[ChatMessage, ...]


Prompt = str | tuple[int, ...] | ChatPrompt


@dataclass(frozen=True)
class ParsedRequest:
    """A valid request body. ``params.max_tokens`` None means "the rest of the context"."""

    kind: Kind
    model: str | None  # None: the served model (vLLM's default)
    prompt: Prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None = None


# ---------------------------------------------------------------------------- field readers

_JSON_TYPE_NAMES = {
    str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object",
}  # fmt: skip


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _wrong_type(param: str, expected: str, value: Any) -> RequestError:
    return bad_request(param, f"'{param}' must be {expected}, got {_json_type(value)}")


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    return value


def _optional_number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _wrong_type(name, "a number", value)
    if not math.isfinite(value):
        raise bad_request(name, f"'{name}' must be a finite number")
    return float(value)


def _optional_bool(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise _wrong_type(name, "a boolean", value)


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _wrong_type(name, "a string", value)


def _refuse_unknown(body: Mapping[str, Any], known: frozenset[str], prefix: str = "") -> None:
    for name in body:
        if name not in known:
            raise bad_request(f"{prefix}{name}", f"unknown field '{prefix}{name}'")


def _refuse_non_neutral(
    body: Mapping[str, Any], neutral: Mapping[str, tuple[str, Callable[[Any], bool]]]
) -> None:
    for name, (off, accepts) in neutral.items():
        if name in body and not accepts(body[name]):
            raise bad_request(name, f"'{name}' is not supported; only {off} is accepted")


# ---------------------------------------------------------------------------- prompts


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompt(value: Any) -> str | tuple[int, ...]:
    """A completions prompt: a string, a list of one string, token ids, or a list of one list
    of token ids. Batches of prompts are refused (one choice per request)."""
    expected = "a string, a list of one string, or a list of token ids"
    if value is None:
        raise bad_request("prompt", "'prompt' is required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _wrong_type("prompt", expected, value)
    if not value:
        raise bad_request("prompt", "'prompt' must not be empty")
    if _is_token_ids(value):
        return tuple(value)
    if all(isinstance(p, str) for p in value) or all(_is_token_ids(p) for p in value):
        if len(value) != 1:
            raise bad_request(
                "prompt", f"only one prompt per request is supported, got {len(value)}"
            )
        return parse_prompt(value[0])
    raise bad_request("prompt", f"'prompt' must be {expected}")


def _content_text(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _wrong_type(param, "a string or a list of text parts", content)
    texts = []
    for number, part in enumerate(content):
        where = f"{param}[{number}]"
        if not isinstance(part, dict):
            raise _wrong_type(where, "an object", part)
        if part.get("type") != "text":
            raise bad_request(f"{where}.type", "only content parts of type 'text' are supported")
        _refuse_unknown(part, frozenset({"type", "text"}), f"{where}.")
        text = part.get("text")
        if not isinstance(text, str):
            raise _wrong_type(f"{where}.text", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _parse_message(message: Any, number: int) -> ChatMessage:
    where = f"messages[{number}]"
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object", message)
    _refuse_unknown(message, MESSAGE_FIELDS, f"{where}.")
    role = message.get("role")
    if not isinstance(role, str):
        raise _wrong_type(f"{where}.role", "a string", role)
    if role not in CHAT_ROLES:
        roles = ", ".join(sorted(CHAT_ROLES))
        raise bad_request(f"{where}.role", f"unsupported role '{role}' (one of {roles})")
    if "content" not in message:
        raise bad_request(f"{where}.content", f"'{where}.content' is required")
    parsed = {"role": role, "content": _content_text(message["content"], f"{where}.content")}
    name = _optional_str(message, "name")
    if name is not None:
        parsed["name"] = name
    return parsed


def parse_messages(value: Any) -> ChatPrompt:
    if value is None:
        raise bad_request("messages", "'messages' is required")
    if not isinstance(value, list):
        raise _wrong_type("messages", "an array of messages", value)
    if not value:
        raise bad_request("messages", "'messages' must not be empty")
    return ChatPrompt(tuple(_parse_message(m, i) for i, m in enumerate(value)))


# ---------------------------------------------------------------------------- sampling


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise bad_request("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
    return tuple(value)


def _parse_stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not _is_token_ids(value):
        raise _wrong_type("stop_token_ids", "an array of integers", value)
    return tuple(value)


def _parse_max_tokens(body: Mapping[str, Any], kind: Kind) -> tuple[int | None, str]:
    """The completion budget and the field it came from (chat prefers max_completion_tokens)."""
    if kind == "chat":
        newer = _optional_int(body, "max_completion_tokens")
        older = _optional_int(body, "max_tokens")
        if newer is not None:
            return newer, "max_completion_tokens"
        return older, "max_tokens"
    if "max_tokens" in body:
        return _optional_int(body, "max_tokens"), "max_tokens"
    return COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens"


def _parse_seed(body: Mapping[str, Any]) -> int | None:
    seed = _optional_int(body, "seed")
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
        raise bad_request("seed", f"'seed' must fit in 64 bits, got {seed}")
    return seed


def _parse_top_k(body: Mapping[str, Any]) -> int:
    top_k = _optional_int(body, "top_k")
    if top_k is None or top_k in (-1, 0):  # vLLM: -1 (older) and 0 both turn it off
        return 0
    if top_k < 0:
        raise bad_request("top_k", f"'top_k' must be -1 or 0 (off) or positive, got {top_k}")
    return top_k


def parse_sampling(body: Mapping[str, Any], kind: Kind) -> SamplingParams:
    max_tokens, max_tokens_field = _parse_max_tokens(body, kind)
    temperature = _optional_number(body, "temperature")
    top_p = _optional_number(body, "top_p")
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": _parse_top_k(body),
        "seed": _parse_seed(body),
        "stop": _parse_stop(body.get("stop")),
        "stop_token_ids": _parse_stop_token_ids(body.get("stop_token_ids")),
        "ignore_eos": bool(_optional_bool(body, "ignore_eos")),
    }
    try:
        return SamplingParams(**fields)
    except ValueError as error:
        # The contract's message is "<field>: <reason>".
        field, _, reason = str(error).partition(": ")
        param = max_tokens_field if field == "max_tokens" else field
        raise bad_request(param, f"'{param}' {reason}") from error


def _parse_n(body: Mapping[str, Any]) -> None:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise bad_request("n", f"only n=1 is supported, got {n}")


def _parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = bool(_optional_bool(body, "stream"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    if not stream:
        raise bad_request(
            "stream_options", "Stream options can only be defined when `stream=True`."
        )
    _refuse_unknown(options, STREAM_OPTIONS_FIELDS, "stream_options.")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _wrong_type("stream_options.include_usage", "a boolean", include_usage)
    return stream, bool(include_usage)


# ---------------------------------------------------------------------------- the request


def parse_request(kind: Kind, body: Any) -> ParsedRequest:
    """A body of POST /v1/completions or /v1/chat/completions, validated."""
    if not isinstance(body, dict):
        raise bad_request("body", f"the request body must be a JSON object, got {_json_type(body)}")
    neutral = dict(NEUTRAL_ONLY)
    neutral |= COMPLETIONS_NEUTRAL_ONLY if kind == "completions" else CHAT_NEUTRAL_ONLY
    known = COMPLETIONS_FIELDS if kind == "completions" else CHAT_FIELDS
    _refuse_unknown(body, known | neutral.keys())
    _refuse_non_neutral(body, neutral)
    prompt: Prompt
    if kind == "completions":
        prompt = parse_prompt(body.get("prompt"))
    else:
        prompt = parse_messages(body.get("messages"))
    _parse_n(body)
    stream, include_usage = _parse_stream(body)
    return ParsedRequest(
        kind=kind,
        model=_optional_str(body, "model"),
        prompt=prompt,
        params=parse_sampling(body, kind),
        stream=stream,
        include_usage=include_usage,
        user=_optional_str(body, "user"),
    )


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise RequestError(
            404, f"The model `{requested}` does not exist.", "model", "NotFoundError"
        )


def prompt_param(kind: Kind) -> str:
    return "prompt" if kind == "completions" else "messages"


def fit_max_tokens(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, kind: Kind
) -> int:
    """The completion budget that fits the context (vLLM's check and messages)."""
    param = prompt_param(kind)
    if max_tokens is None:
        if prompt_tokens >= max_model_len:
            raise bad_request(
                param,
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"request has {prompt_tokens} input tokens. Please reduce the length of the "
                "input messages.",
            )
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            param,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    return max_tokens


# ---------------------------------------------------------------------------- responses


def new_request_id(kind: Kind) -> str:
    return f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def reply_finish_reason(reason: FinishReason | None) -> str:
    """What the client sees; aborted requests get no reply, so only "stop" and "length"."""
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class Reply:
    """Builds one request's response body or stream chunks."""

    kind: Kind
    request_id: str
    created: int  # seconds since the epoch
    model: str
    include_usage: bool = False

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def body(self, text: str, finish_reason: str, used: dict[str, int]) -> dict[str, Any]:
        """The non-streaming response."""
        if self.kind == "completions":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("text_completion", [choice]) | {"usage": used}
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion", [choice]) | {"usage": used}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completions" else "chat.completion.chunk"
        chunk = self._envelope(obj, [{"index": 0, **choice, "logprobs": None}])
        if self.include_usage:  # OpenAI: every chunk has "usage", null until the last
            chunk["usage"] = None
        return chunk

    def role_chunk(self) -> dict[str, Any]:
        """Chat's first chunk: the role, with empty content."""
        return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def delta_chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "completions":
            return self._chunk({"text": text, "finish_reason": finish_reason})
        delta = {"content": text} if text else {}
        return self._chunk({"delta": delta, "finish_reason": finish_reason})

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        """The last chunk when ``include_usage``: no choices, the usage."""
        obj = "text_completion" if self.kind == "completions" else "chat.completion.chunk"
        return self._envelope(obj, []) | {"usage": used}

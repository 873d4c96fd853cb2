"""What the engine's clients (the OpenAI server, the batch runner) hand it and get back (pure).

:class:`EngineClient` is the whole surface the server and the batch runner use: the real
engine (:mod:`tidal.inference_worker.engine.engine`) and the tests' fakes both implement it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling parameters for one request; temperature 0 is greedy.

    ``max_tokens`` None means "up to the model's length" (the engine resolves it).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")

    def problem(self) -> tuple[str, str] | None:
        """The first invalid field and why, or None."""
        if self.max_tokens is not None and self.max_tokens < 1:
            return "max_tokens", f"must be at least 1, got {self.max_tokens}"
        if self.temperature < 0:
            return "temperature", f"must be >= 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            return "top_k", f"must be >= 0 (0 turns it off), got {self.top_k}"
        if any(not s for s in self.stop):
            return "stop", "stop strings must not be empty"
        return None


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request. ``text`` and ``token_ids`` are the DELTA since the
    previous output (stop strings and the text after them are never sent); the last output of
    a request has ``finished`` True and a ``finish_reason``."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int  # so far, cumulative
    finished: bool = False
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class EngineDeadError(RuntimeError):
    """The engine's loop (or a tensor-parallel rank) died; every request fails with this."""


class EngineDrainingError(RuntimeError):
    """The engine stopped admitting requests (SIGTERM): answer 503."""


class TokenizerLike(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str: ...


class EngineClient(Protocol):
    """What the server and the batch runner need from an engine."""

    model_name: str
    max_model_len: int
    tokenizer: TokenizerLike

    def is_ready(self) -> bool:
        """Loaded, alive and admitting requests (False while loading and while draining)."""
        ...

    def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, the last one ``finished``. The caller checked that the
        prompt plus ``max_tokens`` fits ``max_model_len``. Closing the iterator early (a
        client disconnect) aborts the request and frees its KV blocks. Raises
        :class:`EngineDrainingError` when not admitting, :class:`EngineDeadError` when dead."""
        ...

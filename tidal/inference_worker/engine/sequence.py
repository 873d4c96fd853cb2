"""One request inside the engine (pure): its tokens, how many of them the KV cache holds, its
blocks, and its timeline for the latency metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tidal.inference_worker.engine.blocks import BlockHash
from tidal.inference_worker.engine.params import FinishReason, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: two requests with equal fields are still two requests
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against the model's length
    arrival: float = 0.0
    tokens: list[int] = field(init=False)  # prompt, then output
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of the published full blocks
    admissions: int = 0  # 1 + the times it was readmitted after a preemption
    cached_prompt_tokens: int = 0  # served from the prefix cache at first admission
    finish_reason: FinishReason | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent_text: str = ""  # decoded output text already sent to the client
    held_text: str = ""  # decoded text held back (a stop string may be forming)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        self.tokens = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def remaining(self) -> int:
        """Tokens known but not in the cache: the whole prompt at first, 1 while decoding."""
        return len(self.tokens) - self.num_computed

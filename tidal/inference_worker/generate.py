"""One prompt in, one continuation out, on every tensor-parallel rank in lockstep: the smallest
real use of the model (``tidal worker generate``) and the harness the benchmarks time.

Rank 0 holds the full logits (the LM head gathers them there), samples, and broadcasts each
token so every rank feeds the same one to the next step. Prefill is ISO when the split chooser
expects it to beat serial prefill (tensor parallelism > 1 and a long enough prompt), else
serial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from tidal.inference_worker.engine.params import SamplingParams
from tidal.inference_worker.iso import prefill_iso
from tidal.inference_worker.iso_split import OpCosts, choose_split


def sample(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> int:
    """The next token from ``logits`` [vocab]: argmax at temperature 0, else top-k, then
    top-p (nucleus) filtering of the tempered distribution."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = (
            cumulative - torch.softmax(ordered, dim=-1) >= sampling.top_p
        )  # keep the first past p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"
    iso_split: int | None  # the prompt's split point when prefill was ISO

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes with prefill
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


def prefill(model: Any, ids: torch.Tensor, cache: Any, split: int | None) -> torch.Tensor | None:
    """Last-position logits (on rank 0; None elsewhere), serial or ISO at ``split``."""
    if split is None:
        hidden = model.forward(ids, cache, 0)
    else:
        hidden = prefill_iso(model, ids, cache, split)
    logits: torch.Tensor | None = model.logits(hidden[-1:])
    return logits


def iso_split_for(model: Any, costs: OpCosts | None, tokens: int, min_tokens: int) -> int | None:
    """Where to split a prompt of ``tokens`` (None: serial), decided on rank 0 and shared."""
    if costs is None or model.comm.world == 1:
        return None
    choice = choose_split(costs, tokens, len(model.layers), min_tokens=min_tokens)
    split: int | None = model.comm.broadcast_object(choice.split)
    return split


def generate(
    model: Any,
    prompt_ids: list[int],
    sampling: SamplingParams,
    eos_ids: frozenset[int] = frozenset(),
    *,
    costs: OpCosts | None = None,
    iso_min_tokens: int = 256,
) -> Generation:
    """Prefill ``prompt_ids`` and decode up to ``sampling.max_tokens`` tokens, on every rank."""
    comm = model.comm
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=model.placement.device)
    if sampling.max_tokens is None:
        raise ValueError("max_tokens: generate() needs a number of tokens")
    max_tokens = sampling.max_tokens
    cache = model.new_cache(len(prompt_ids) + max_tokens)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    split = iso_split_for(model, costs, len(prompt_ids), iso_min_tokens)
    started = time.perf_counter()
    with torch.inference_mode():
        token = _next(comm, prefill(model, ids, cache, split), sampling, generator)
        prefilled = time.perf_counter()
        tokens = [token]
        while len(tokens) < max_tokens and not _stops(token, eos_ids, sampling):
            position = len(prompt_ids) + len(tokens) - 1
            logits = model.decode_step(token, cache, position)
            token = _next(comm, logits, sampling, generator)
            tokens.append(token)
    finished = time.perf_counter()
    reason = "stop" if _stops(tokens[-1], eos_ids, sampling) else "length"
    return Generation(
        tokens, len(prompt_ids), prefilled - started, finished - prefilled, reason, split
    )


def _next(
    comm: Any,
    logits: torch.Tensor | None,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> int:
    """Rank 0 samples from its full logits; every rank gets that token."""
    row = logits.reshape(-1, logits.shape[-1])[-1] if logits is not None else None
    token = sample(row, sampling, generator) if row is not None else -1
    chosen: int = comm.broadcast_object(token)
    return chosen


def _stops(token: int, eos_ids: frozenset[int], sampling: SamplingParams) -> bool:
    return token in eos_ids and not sampling.ignore_eos

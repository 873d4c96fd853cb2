"""ISO prefill: the prompt in two chunks, each chunk's tensor-parallel all-reduce overlapped with
the other chunk's compute, over the same decoder layers as serial prefill.

Per layer l, on every rank (A: attention block, F: MLP block, AR: all-reduce of its partial sum):

    A0(l) → [AR(o0) ‖ A1(l)] → wait o0 → [AR(o1) ‖ F0(l)] → wait o1 → [AR(m0) ‖ F1(l)]
          → wait m0 → [AR(m1) ‖ A0(l+1)] → wait m1 → A1(l+1) …

Chunk 1 attends to chunk 0's keys of the same layer (written to the KV cache by A0 first) with
the causal mask offset by the split: the only dependency between the chunks. Every other step
is token-local, so the result equals serial prefill up to floating-point summation order, and
the KV cache it leaves is the same. The split point comes from :mod:`.iso_split`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tidal.inference_worker.iso_split import OpCosts
from tidal.inference_worker.parallel.comm import Handle


def _positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device)


class _Chunk:
    """One chunk's residual stream and the all-reduce in flight on its partial sum."""

    def __init__(self, x: torch.Tensor, start: int) -> None:
        self.x = x
        self.start = start
        self.positions = _positions(start, x.shape[0], x.device)
        self.pending: tuple[Handle, torch.Tensor] | None = None

    def issue(self, comm: Any, partial: torch.Tensor) -> None:
        self.pending = (comm.all_reduce_async(partial), partial)

    def settle(self) -> None:
        """Wait for the partial sum in flight and add it to the residual stream."""
        if self.pending is not None:
            handle, partial = self.pending
            handle.wait()
            self.x = self.x + partial
            self.pending = None


def prefill_iso(
    model: Any, ids: torch.Tensor, cache: Any, split: int, start: int = 0
) -> torch.Tensor:
    """Hidden states [S, d] of ``ids`` [S] at positions ``start ..`` after every layer, chunks
    [0, split) and [split, S), filling ``cache`` like ``model.forward(ids, cache, start)`` (a
    ``start`` > 0 continues a cached prefix)."""
    total = ids.shape[0]
    if not 0 < split < total:
        raise ValueError(f"ISO split {split} must lie strictly inside the prompt of {total} tokens")
    x = model.embed(ids)
    first, second = _Chunk(x[:split], start), _Chunk(x[split:], start + split)
    comm = model.comm
    for index, layer in enumerate(model.layers):
        kv = cache[index]
        first.issue(comm, layer.attention_partial(first.x, first.positions, kv, start))
        second.settle()  # the previous layer's MLP sum of chunk 1
        attended = layer.attention_partial(second.x, second.positions, kv, start + split)
        first.settle()
        second.issue(comm, attended)
        mlp = layer.mlp_partial(first.x)
        second.settle()
        first.issue(comm, mlp)
        mlp = layer.mlp_partial(second.x)
        first.settle()
        second.issue(comm, mlp)
    second.settle()
    return torch.cat([first.x, second.x])


# -- measured op costs for the split chooser ------------------------------------------------


def _seconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def measure_costs(model: Any, sizes: tuple[int, int] = (64, 256)) -> OpCosts:
    """Fit :class:`OpCosts` from the first layer's ops at two prompt sizes on this rank (and
    the all-reduce over the real group): what the split chooser needs, measured at start-up
    (on a scratch KV cache)."""
    small, large = sizes
    cache = model.new_cache(large)
    layer, comm = model.layers[0], model.comm
    hidden = model.spec.hidden_size

    def attention(tokens: int) -> float:
        x = torch.randn(tokens, hidden, dtype=model.placement.dtype, device=model.placement.device)
        positions = _positions(0, tokens, x.device)
        return _seconds(lambda: layer.attention_partial(x, positions, cache[0], 0))

    def mlp(tokens: int) -> float:
        x = torch.randn(tokens, hidden, dtype=model.placement.dtype, device=model.placement.device)
        return _seconds(lambda: layer.mlp_partial(x))

    def reduce(tokens: int) -> float:
        x = torch.zeros(tokens, hidden, dtype=model.placement.dtype, device=model.placement.device)
        return _seconds(lambda: comm.all_reduce(x))

    a_small, a_large = attention(small), attention(large)
    # attention(T) = a_token·T + a_pair·T·(T+1)/2: two sizes fix both coefficients
    pair_small, pair_large = small * (small + 1) / 2, large * (large + 1) / 2
    det = small * pair_large - large * pair_small
    a_pair = max(0.0, (small * a_large - large * a_small) / det)
    a_token = max(0.0, (a_small - a_pair * pair_small) / small)
    r_small, r_large = reduce(small), reduce(large)
    r_token = max(0.0, (r_large - r_small) / (large - small))
    return OpCosts(
        a_token=a_token,
        a_pair=a_pair,
        f_token=mlp(large) / large,
        r_fixed=max(0.0, r_small - r_token * small),
        r_token=r_token,
    )

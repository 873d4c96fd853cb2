"""Where to split a prompt for ISO prefill, from measured op times (pure: no torch).

ISO (intra-sequence overlap) splits a prompt of S tokens into chunk 0 = [0, s1) and chunk 1 =
[s1, S) and overlaps each chunk's tensor-parallel all-reduce with the other chunk's compute
(:mod:`tidal.inference_worker.iso`). Per layer, with one communication stream:

    T_iso ≈ max(A1, R_o0) + max(F0, R_o1) + max(F1, R_m0) + max(A0', R_m1)

plus the first layer's A0 and the last R_m1; serial prefill costs A + F + R_o + R_m a layer.
A is a chunk's attention block (norm, QKV, attention over every earlier key, o_proj), F its
MLP block, R an all-reduce of its activations. Attention grows with the keys a chunk sees, so
equal compute puts s1 between S/2 (GEMM-dominated) and S/√2 (attention-dominated); the chooser
minimises T_iso over split points on a block grid instead of assuming either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpCosts:
    """Seconds per op of one layer on one rank, as linear fits measured at start-up:
    attention = a_token·T + a_pair·T·(keys seen, averaged over the chunk's rows),
    mlp = f_token·T, all-reduce = r_fixed + r_token·T (the rank's activations of T tokens)."""

    a_token: float
    a_pair: float
    f_token: float
    r_fixed: float
    r_token: float

    def attention(self, tokens: int, offset: int) -> float:
        seen = offset + (tokens + 1) / 2  # a causal row i of the chunk sees offset + i + 1 keys
        return self.a_token * tokens + self.a_pair * tokens * seen

    def mlp(self, tokens: int) -> float:
        return self.f_token * tokens

    def all_reduce(self, tokens: int) -> float:
        return self.r_fixed + self.r_token * tokens


def serial_time(costs: OpCosts, tokens: int, layers: int) -> float:
    a, f, r = costs.attention(tokens, 0), costs.mlp(tokens), costs.all_reduce(tokens)
    return layers * (a + f + 2 * r)


def iso_time(costs: OpCosts, tokens: int, split: int, layers: int) -> float:
    """The cost model above for chunk 0 = [0, split), chunk 1 = [split, tokens)."""
    n0, n1 = split, tokens - split
    a0, a1 = costs.attention(n0, 0), costs.attention(n1, split)
    f0, f1 = costs.mlp(n0), costs.mlp(n1)
    r0, r1 = costs.all_reduce(n0), costs.all_reduce(n1)
    per_layer = max(a1, r0) + max(f0, r1) + max(f1, r0) + max(a0, r1)
    # the first layer's A0 runs with nothing to hide; the last layer's R_m1 with nothing after
    return a0 + (layers - 1) * per_layer + (max(a1, r0) + max(f0, r1) + max(f1, r0)) + r1


@dataclass(frozen=True)
class SplitChoice:
    split: int | None  # None: serial prefill is expected to be faster
    iso_s: float
    serial_s: float


def choose_split(
    costs: OpCosts,
    tokens: int,
    layers: int,
    *,
    block: int = 64,
    min_tokens: int = 256,
    tolerance: float = 0.005,
) -> SplitChoice:
    """The split point on a ``block`` grid that minimises :func:`iso_time`, or None when the
    prompt is shorter than ``min_tokens`` or ISO would not beat serial prefill. Splits within
    ``tolerance`` of the best are equal to the model (its inputs are measured, so noisy): of
    those, the one closest to equal compute per chunk wins, which leaves each chunk's
    all-reduce the longest window of the other chunk's compute to hide in."""
    serial = serial_time(costs, tokens, layers)
    if tokens < max(min_tokens, 2):
        return SplitChoice(None, serial, serial)
    candidates = list(range(block, tokens, block) if tokens > block else range(1, tokens))
    times = {s: iso_time(costs, tokens, s, layers) for s in candidates}
    best = min(times.values())
    near = [s for s in candidates if times[s] <= best * (1 + tolerance)]
    split = min(near, key=lambda s: (abs(_imbalance(costs, tokens, s)), s))
    iso = times[split]
    return SplitChoice(split if iso < serial else None, iso, serial)


def _imbalance(costs: OpCosts, tokens: int, split: int) -> float:
    """Chunk 0's compute minus chunk 1's (attention and MLP), in seconds."""
    first = costs.attention(split, 0) + costs.mlp(split)
    second = costs.attention(tokens - split, split) + costs.mlp(tokens - split)
    return first - second


def exposed_share_hidden(serial_s: float, iso_s: float, compute_s: float) -> float:
    """η = (T_serial − T_iso) / (T_serial − T_compute): the share of the communication that
    serial prefill exposes which ISO hides (1: all of it; 0: none; below 0: ISO is slower)."""
    exposed = serial_s - compute_s
    return (serial_s - iso_s) / exposed if exposed > 0 else 0.0

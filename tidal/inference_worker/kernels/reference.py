"""The float64 reference every kernel is measured against, the error metrics, and the input
distributions the accuracy targets are stated for (docs/architecture.md, "Kernels")."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    q_offset: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ · sm_scale) v in float64, SDPA shapes (B, H, N, D); KV heads shared by
    groups of query heads (GQA); causal masks are top-left aligned like SDPA's ``is_causal``,
    or with query row i at key position i + ``q_offset``."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    scores = q64 @ k64.transpose(-1, -2) * sm_scale
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(q_offset)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖O − O_ref‖ / ‖O_ref‖ over every element."""
    diff = output.double() - reference.double()
    return float(diff.norm() / reference.double().norm())


def cosine_similarity(output: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = output.double().flatten(), reference.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


INPUT_KINDS = ("randn", "uniform", "biased", "peaky")


def make_inputs(
    kind: str, n: int, d: int, q_heads: int = 2, kv_heads: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 (1, heads, n, d) q, k, v: randn; the paper's uniform [0, 1); K with a few large
    outlier channels plus a bias on every channel ("biased"); peaky logits (query scaled 3x:
    score std about 3)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind {kind!r} is not one of {', '.join(INPUT_KINDS)}")
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (1, q_heads, n, d), (1, kv_heads, n, d)
    if kind == "uniform":
        return (torch.rand(shape_q, generator=g), torch.rand(shape_kv, generator=g),
                torch.rand(shape_kv, generator=g))  # fmt: skip
    q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    if kind == "biased":
        outliers = torch.randperm(d, generator=g)[:4]
        k = k + 2 * torch.randn(d, generator=g)
        k[..., outliers] += 20.0
    elif kind == "peaky":
        q = q * 3.0
    return q, k, v

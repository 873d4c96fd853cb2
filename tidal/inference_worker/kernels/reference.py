"""The float64 reference every kernel is measured against, and the error metrics."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
) -> torch.Tensor:
    """softmax(q kᵀ · sm_scale) v in float64, SDPA shapes (B, H, N, D); KV heads shared by
    groups of query heads (GQA); causal masks are top-left aligned like SDPA's ``is_causal``."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    scores = q64 @ k64.transpose(-1, -2) * sm_scale
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖O − O_ref‖ / ‖O_ref‖ over every element."""
    diff = output.double() - reference.double()
    return float(diff.norm() / reference.double().norm())


def cosine_similarity(output: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = output.double().flatten(), reference.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))

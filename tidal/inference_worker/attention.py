"""Causal attention of T new queries against a sequence's cached keys, with a query offset.

The queries are positions ``offset .. offset + T - 1`` and the keys positions ``0 .. offset +
T - 1``: query i sees keys ``0 .. offset + i`` (the mask is bottom-right aligned).

Backends:

- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (CPU and GPU), GQA by ``enable_gqa``.
- ``int8``: the Triton INT8 FlashAttention kernel for prefill, with its ``q_offset`` where
  it takes one. A kernel without it (its causal mask top-left aligned) gets two calls whose
  results are merged by their log-sum-exps: a non-causal part (keys ``[0, offset)``) and a
  causal part (keys ``[offset, offset + T)``). Decode (T = 1) always runs SDPA: one query
  row is memory-bound and gains nothing from INT8. Without a GPU or Triton's interpreter
  (``TRITON_INTERPRET=1``), or for a head_dim the kernel lacks, it logs once and uses SDPA.

The kernel is imported on first use so that the SDPA path never imports Triton.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from torch.nn import functional

BACKENDS = ("sdpa", "int8")
INT8_HEAD_DIMS = (64, 128)  # the kernel's (kernels.launch.HEAD_DIMS)

log = logging.getLogger(__name__)
_warned: set[str] = set()
use_kernel_offset = True  # False: the LSE merge even where the kernel takes q_offset (tests)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, backend: str = "sdpa"
) -> torch.Tensor:
    """Attention of q ``[H, T, D]`` against k, v ``[H_kv, offset + T, D]`` (H a multiple of
    H_kv), scaled by D^-1/2, causal with query offset ``offset``. Returns ``[H, T, D]``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if k.shape[1] != offset + q.shape[1]:
        raise ValueError(f"{k.shape[1]} keys for {q.shape[1]} queries at offset {offset}")
    if backend == "int8" and q.shape[1] > 1 and _int8_usable(q):
        return _int8(q, k, v, offset)
    return sdpa(q, k, v, offset)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """The SDPA backend: ``is_causal`` when the queries are the whole sequence, an explicit
    bottom-right mask ``col <= row + offset`` otherwise (SDPA's ``is_causal`` is top-left)."""
    t, s = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if offset == 0 and t == s:
        out = functional.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=gqa
        )
    elif t == 1:  # one query at the end sees every key
        out = functional.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=gqa)
    else:
        rows = torch.arange(t, device=q.device)[:, None]  # [T, 1]
        cols = torch.arange(s, device=q.device)[None, :]  # [1, S]
        mask = cols <= rows + offset  # [T, S]
        out = functional.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, enable_gqa=gqa
        )
    return out[0]  # [H, T, D]


def _int8_usable(q: torch.Tensor) -> bool:
    if q.shape[-1] not in INT8_HEAD_DIMS:
        _warn_once(f"head_dim {q.shape[-1]}", "the INT8 kernel supports head_dim 64 and 128")
        return False
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        _warn_once("cpu", "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
        return False
    if q.device.type not in ("cpu", "cuda"):
        _warn_once(q.device.type, f"the INT8 kernel does not run on {q.device.type}")
        return False
    try:
        import triton  # noqa: F401, PLC0415  (optional: only the int8 backend needs it)
    except ImportError:
        _warn_once("triton", "Triton is not installed")
        return False
    return True


def _warn_once(key: str, why: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("attention='int8' falls back to SDPA: %s", why)


def _int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """INT8 prefill: one kernel call with ``q_offset`` where the kernel takes it, else the LSE
    merge of the past (non-causal) and the new (causal, top-left aligned) keys."""
    from tidal.inference_worker.kernels.attention import int8_attention  # noqa: PLC0415

    dtype = q.dtype
    work = torch.float32 if dtype == torch.float64 else dtype  # the kernel has no fp64
    q, k, v = (t.to(work)[None] for t in (q, k, v))  # [1, H, T, D], [1, H_kv, S, D]
    if offset == 0:
        out = int8_attention(q, k, v, causal=True)
    elif use_kernel_offset and "q_offset" in inspect.signature(int8_attention).parameters:
        out = int8_attention(q, k, v, causal=True, q_offset=offset)
    else:
        past = int8_attention(q, k[:, :, :offset], v[:, :, :offset], return_lse=True)
        new = int8_attention(q, k[:, :, offset:], v[:, :, offset:], causal=True, return_lse=True)
        assert isinstance(past, tuple) and isinstance(new, tuple)
        return merge(past[0][0], past[1][0], new[0][0], new[1][0]).to(dtype)
    assert isinstance(out, torch.Tensor)
    return out[0].to(dtype)


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's output
    ``[H, T, D]`` and natural-log LSE ``[H, T]`` (the kernel converts its base-2 running max
    and sum to natural log, and adds the smoothing correction, before returning it)."""
    lse = torch.logaddexp(lse1, lse2)  # [H, T]
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)  # [H, T, 1]
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return o1.float() * w1 + o2.float() * w2  # [H, T, D]

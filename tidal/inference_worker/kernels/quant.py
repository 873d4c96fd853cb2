"""Quantization kernels: Q and K per token, V per channel.

Q and K: one scale per token (row of D), int8 = round(x / scale), scale = max|x| / 127. K may
first have its per-channel mean over tokens subtracted ("smoothing"): a channel that is large
for every key shifts each query's scores by one constant per query row, which softmax ignores,
so the attention output is exactly unchanged while the quantization range shrinks to what
differs between keys. Only the log-sum-exp needs the constant back (the wrapper adds it).

V: one scale per channel, stored transposed (B, H, D, N) so the P·V operand is contiguous along
the reduction axis, which 8-bit tensor-core matmuls on Hopper require.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 64


@triton.jit
def _round_to_int8(x):  # type: ignore[no-untyped-def]
    # round half away from zero; the cast truncates toward zero
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(  # type: ignore[no-untyped-def]
    x_ptr, mean_ptr, out_ptr, scale_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd,
    heads, rows, multiplier,
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
):  # fmt: skip
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_n = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    inside = offs_n < rows
    pointers = x_ptr + b * stride_xb + h * stride_xh
    pointers += offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
    x = tl.load(pointers, mask=inside[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        x -= tl.load(mean_ptr + bh * D + offs_d)[None, :]
        x = tl.where(inside[:, None], x, 0.0)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 127.0
    quantized = _round_to_int8(x / scale[:, None])
    tl.store(out_ptr + (bh * rows + offs_n)[:, None] * D + offs_d[None, :], quantized,
             mask=inside[:, None])  # fmt: skip
    tl.store(scale_ptr + bh * rows + offs_n, scale * multiplier, mask=inside)


@triton.jit
def _quantize_v_kernel(  # type: ignore[no-untyped-def]
    v_ptr, inverse_ptr, out_ptr,
    stride_vb, stride_vh, stride_vn, stride_vd,
    heads, rows,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_n = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    inside = offs_n < rows
    pointers = v_ptr + b * stride_vb + h * stride_vh
    pointers += offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    v = tl.load(pointers, mask=inside[:, None], other=0.0).to(tl.float32)
    inverse = tl.load(inverse_ptr + bh * D + offs_d)
    quantized = _round_to_int8(v * inverse[None, :])
    # transposed: element (n, d) of head bh at bh*D*rows + d*rows + n
    tl.store(out_ptr + bh * D * rows + offs_d[None, :] * rows + offs_n[:, None], quantized,
             mask=inside[:, None])  # fmt: skip


def quantize_per_token(
    x: torch.Tensor, mean: torch.Tensor | None = None, multiplier: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (B, H, N, D) contiguous and float32 scales (B, H, N) times ``multiplier`` (the
    softmax scale folds in here). ``mean`` (B, H, 1, D) is subtracted first when given."""
    batch, heads, rows, dim = x.shape
    out = torch.empty((batch, heads, rows, dim), dtype=torch.int8, device=x.device)
    scales = torch.empty((batch, heads, rows), dtype=torch.float32, device=x.device)
    mean_arg = mean.float().contiguous() if mean is not None else scales
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), batch * heads)
    _quantize_rows_kernel[grid](
        x, mean_arg, out, scales, *x.stride(), heads, rows, multiplier,
        D=dim, BLOCK=ROWS_PER_PROGRAM, HAS_MEAN=mean is not None,
    )  # fmt: skip
    return out, scales


def quantize_v_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 Vᵀ (B, H, D, N) contiguous and float32 scales (B, H, D)."""
    batch, heads, rows, dim = v.shape
    scales = (v.float().abs().amax(dim=2).clamp_min(1e-12) / 127.0).contiguous()
    out = torch.empty((batch, heads, dim, rows), dtype=torch.int8, device=v.device)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), batch * heads)
    _quantize_v_kernel[grid](
        v, (1.0 / scales).contiguous(), out, *v.stride(), heads, rows,
        D=dim, BLOCK=ROWS_PER_PROGRAM,
    )  # fmt: skip
    return out, scales

"""INT8 FlashAttention forward in Triton, and a Triton FP16 fused attention from the same source.

One program computes BLOCK_M query rows of one head against every visible key, BLOCK_N keys at
a time, with the online softmax of FlashAttention in base 2: the softmax scale and log2(e) are
folded into the query scales at quantization, so a score is one int32 dot times two scales.

P (the probabilities of one key block, all in [0, 1] relative to the running max) is multiplied
with V in one of four modes:

- ``int8_rowblock`` (default): P quantized with a scale per query row per key block,
  max(P_row) / 127. Blocks far below the row's maximum keep their resolution, so the error stays
  flat as sequences grow.
- ``int8_static``: the fixed scale 1/127 of INT-FlashAttention (paper parity).
- ``fp16``: P and V in fp16 (only QKᵀ in int8).
- ``fp8``: P and V in float8 e4m3 with the row-block scale (Ada/Hopper GPUs only).

Causal masks are top-left aligned (SDPA's ``is_causal``) unless ``q_offset`` says where the
queries start among the keys: query row i sees keys [0, i + q_offset], as in a KV cache (ISO's
second chunk, prefix-cache hits, chunked prefill). The running max and sum are carried through
the diagonal block like every other block, which the paper's public kernel does not do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tidal.inference_worker.kernels.launch import HEAD_DIMS, P_MODES, LaunchConfig, choose_launch
from tidal.inference_worker.kernels.quant import quantize_per_token, quantize_v_per_channel

LOG2E = 1.4426950408889634
_MODE_IDS = {mode: i for i, mode in enumerate(P_MODES)}  # the kernel's P_MODE constexpr
_FP8_MAX = 448.0  # largest finite float8 e4m3 value


class KernelError(ValueError):
    """Inputs the kernels cannot take; the message names the argument and what is supported."""


@triton.jit
def _probabilities_times_v(p, v, P_MODE: tl.constexpr):  # type: ignore[no-untyped-def]
    """P (BLOCK_M x BLOCK_N, values in [0, 1]) times the V tile, in fp32. P_MODE is a
    constexpr: one branch is compiled."""
    if P_MODE == 0:  # int8, one scale per row per key block
        p_scale = tl.maximum(tl.max(p, axis=1), 1e-30) / 127.0
        p8 = (p / p_scale[:, None] + 0.5).to(tl.int8)
        pv = tl.dot(p8, v, out_dtype=tl.int32).to(tl.float32) * p_scale[:, None]
    elif P_MODE == 1:  # int8, the paper's fixed 1/127
        p8 = (p * 127.0 + 0.5).to(tl.int8)
        pv = tl.dot(p8, v, out_dtype=tl.int32).to(tl.float32) * (1.0 / 127.0)
    elif P_MODE == 2:  # fp16
        pv = tl.dot(p.to(tl.float16), v)
    else:  # fp8 e4m3, one scale per row per key block
        p_scale = tl.maximum(tl.max(p, axis=1), 1e-30) / 448.0
        p8 = (p / p_scale[:, None]).to(tl.float8e4nv)
        pv = tl.dot(p8, v) * p_scale[:, None]
    return pv


@triton.jit
def _attention_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    q_heads, kv_heads, group, seq_q, seq_k, qk_multiplier, q_offset,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    QK_MODE: tl.constexpr, P_MODE: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // q_heads, bh % q_heads
    kv = b * kv_heads + h // group  # the KV head this query head reads
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows_in = offs_m < seq_q

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh
        + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=rows_in[:, None], other=0.0,
    )  # fmt: skip
    if QK_MODE != 1:  # scaled 8-bit Q (int8 or fp8): one scale per token
        q_scale = tl.load(q_scale_ptr + bh * seq_q + offs_m, mask=rows_in, other=0.0)
    k_base = k_ptr + b * stride_kb + (h // group) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // group) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end = seq_k
    if CAUSAL:  # the block's last row sees keys up to its index plus the offset
        end = tl.minimum(seq_k, (block + 1) * BLOCK_M + q_offset)
    for start in range(0, end, BLOCK_N):
        cols = start + offs_n
        cols_in = cols < seq_k
        k = tl.load(
            k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=cols_in[:, None], other=0.0,
        )  # fmt: skip
        if QK_MODE == 0:  # int8
            k_scale = tl.load(k_scale_ptr + kv * seq_k + cols, mask=cols_in, other=0.0)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
            s = s * q_scale[:, None] * k_scale[None, :]
        elif QK_MODE == 1:  # fp16
            s = tl.dot(q, tl.trans(k)) * qk_multiplier
        else:  # fp8 e4m3 (the FP8 baseline)
            k_scale = tl.load(k_scale_ptr + kv * seq_k + cols, mask=cols_in, other=0.0)
            s = tl.dot(q, tl.trans(k)) * q_scale[:, None] * k_scale[None, :]
        visible = cols_in[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + q_offset)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=cols_in[:, None], other=0.0,
        )  # fmt: skip
        pv = _probabilities_times_v(p, v, P_MODE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if P_MODE != 2:  # V was quantized per channel: its scale factors out of the sum over keys
        acc = acc * tl.load(v_scale_ptr + kv * D + offs_d)[None, :]
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh
        + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty), mask=rows_in[:, None],
    )  # fmt: skip
    if STORE_LSE:  # natural-log log-sum-exp of the scaled scores
        tl.store(lse_ptr + bh * seq_q + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634,
                 mask=rows_in)  # fmt: skip


# -- entry points -------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantized:
    """Attention operands after quantization: what the kernel reads."""

    q: torch.Tensor  # int8 (B, Hq, N, D)
    k: torch.Tensor  # int8 (B, Hkv, N_k, D)
    v: torch.Tensor  # (B, Hkv, N_k, D) view: int8 (over Vᵀ storage), fp16 or fp8
    q_scale: torch.Tensor  # per token, times sm_scale·log2(e)
    k_scale: torch.Tensor  # per token
    v_scale: torch.Tensor  # per channel (unused for fp16 P)
    k_mean: torch.Tensor | None  # the smoothing mean, for the LSE correction
    p_mode: str
    sm_scale: float
    dtype: torch.dtype  # the caller's dtype, for the output


def quantize_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    p_mode: str = "int8_rowblock",
    smooth_k: bool = True,
) -> Quantized:
    """Run the quantization kernels (the part of :func:`int8_attention` before attention)."""
    _check(q, k, v, p_mode, None)
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    mean = k.float().mean(dim=2, keepdim=True) if smooth_k else None
    q8, q_scale = quantize_per_token(q, multiplier=scale * LOG2E)
    k8, k_scale = quantize_per_token(k, mean=mean)
    if p_mode == "fp16":
        v_op, v_scale = v.to(torch.float16), k_scale  # v_scale unused by the kernel
    elif p_mode == "fp8":
        v_op, v_scale = _fp8_v_per_channel(v)
    else:
        vt, v_scale = quantize_v_per_channel(v)
        v_op = vt.transpose(-1, -2)  # a (B, H, N, D) view of the (B, H, D, N) storage
    return Quantized(q8, k8, v_op, q_scale, k_scale, v_scale, mean, p_mode, scale, q.dtype)


def attention_quantized(
    operands: Quantized,
    causal: bool = False,
    *,
    q_offset: int = 0,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention kernel alone on quantized operands (what the benchmark times as
    "kernel only"). The LSE correction for smoothing needs the unquantized ``q``."""
    x = operands
    compute_dtype = _compute_dtype(x.q.device, x.dtype)
    o, lse = _launch(x.q, x.k, x.v, x.q_scale, x.k_scale, x.v_scale, causal, x.p_mode, 0,
                     0.0, compute_dtype, out, return_lse, config, q_offset)  # fmt: skip
    o = o if out is not None else o.to(x.dtype)
    if not return_lse:
        return o, None
    if x.k_mean is not None:  # smoothing shifted every score of a query row by q·mean·scale
        if q is None:
            raise KernelError("return_lse with smooth_k needs q for the correction")
        group = q.shape[1] // x.k.shape[1]
        mean = x.k_mean.repeat_interleave(group, dim=1)
        lse = lse + (q.float() @ mean.transpose(-1, -2)).squeeze(-1) * x.sm_scale
    return o, lse


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    *,
    q_offset: int = 0,
    p_mode: str = "int8_rowblock",
    smooth_k: bool = True,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention like ``torch.nn.functional.scaled_dot_product_attention`` (q (B, Hq, N, D),
    k and v (B, Hkv, N_k, D), Hq a multiple of Hkv) with INT8 QKᵀ and P·V per ``p_mode``.
    ``q_offset`` (causal only) places query row i at key position i + q_offset. Returns the
    output in q's dtype, and the log-sum-exp (B, Hq, N) in float32 when asked."""
    _check(q, k, v, p_mode, out, causal, q_offset)
    operands = quantize_inputs(q, k, v, sm_scale, p_mode, smooth_k)
    o, lse = attention_quantized(
        operands, causal, q_offset=q_offset, return_lse=return_lse, out=out, config=config, q=q
    )
    return (o, lse) if lse is not None else o


def triton_fp16_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    config: LaunchConfig | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """The same kernel with fp16 QKᵀ and P·V: the same-framework baseline for the benchmark."""
    _check(q, k, v, "fp16", None, causal, q_offset)
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    half = [t.to(torch.float16) for t in (q, k, v)]
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    dtype = _compute_dtype(q.device, q.dtype)
    o, _ = _launch(half[0], half[1], half[2], dummy, dummy, dummy, causal, "fp16", 1,
                   scale * LOG2E, dtype, None, False, config, q_offset)  # fmt: skip
    return o.to(q.dtype)


def triton_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """The FP8 baseline: Q and K in float8 e4m3 with per-token scales, P and V in e4m3 (the
    ``fp8`` P mode). Ada/Hopper GPUs only."""
    _check(q, k, v, "fp8", None)
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    q8, q_scale = _fp8_per_token(q, scale * LOG2E)
    k8, k_scale = _fp8_per_token(k, 1.0)
    v8, v_scale = _fp8_v_per_channel(v)
    o, _ = _launch(q8, k8, v8, q_scale, k_scale, v_scale, causal, "fp8", 2, 0.0, q.dtype,
                   None, False, config)  # fmt: skip
    return o


def _fp8_per_token(x: torch.Tensor, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    scales = x.float().abs().amax(dim=-1).clamp_min(1e-12) / _FP8_MAX
    x8 = (x.float() / scales[..., None]).to(torch.float8_e4m3fn)
    return x8, (scales * multiplier).contiguous()


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    causal: bool, p_mode: str, qk_mode: int, qk_multiplier: float,
    compute_dtype: torch.dtype, out: torch.Tensor | None, return_lse: bool,
    config: LaunchConfig | None, q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    target = out if out is not None and out.dtype == compute_dtype else None
    o = target if target is not None else torch.empty(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.empty((batch, q_heads, seq_q), dtype=torch.float32, device=q.device)
    launch = config or choose_launch(dim, seq_q, seq_k, p_mode, _capability(q))
    grid = (triton.cdiv(seq_q, launch.block_m), batch * q_heads)
    _attention_kernel[grid](
        q, k, v, q_scale, k_scale, v_scale, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        q_heads, kv_heads, q_heads // kv_heads, seq_q, seq_k, qk_multiplier, q_offset,
        D=dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, CAUSAL=causal,
        QK_MODE=qk_mode, P_MODE=_MODE_IDS[p_mode], STORE_LSE=return_lse,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    if out is not None and target is None:
        out.copy_(o)
        o = out
    return o, lse


def _fp8_v_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = (v.float().abs().amax(dim=2).clamp_min(1e-12) / _FP8_MAX).contiguous()
    v8 = (v.float() / scales[:, :, None, :]).to(torch.float8_e4m3fn)
    return v8, scales


def _capability(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major, minor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype; the CPU interpreter computes bf16 as fp32 (its bf16 is unreliable)."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p_mode: str,
    out: torch.Tensor | None,
    causal: bool = False,
    q_offset: int = 0,
) -> None:
    _check_tensors(q, k, v, out)
    if q_offset and not causal:
        raise KernelError("q_offset applies to causal attention only")
    if causal and (q_offset < 0 or q_offset + q.shape[2] > k.shape[2]):
        raise KernelError(
            f"q_offset {q_offset}: queries {q_offset}..{q_offset + q.shape[2] - 1} must lie "
            f"among the {k.shape[2]} keys"
        )
    if p_mode not in P_MODES:
        raise KernelError(f"p_mode {p_mode!r} is not one of {', '.join(P_MODES)}")
    if q.device.type == "cpu" and not _interpreting():
        raise KernelError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1")
    if q.device.type not in ("cpu", "cuda"):
        raise KernelError(f"device {q.device} is not supported (CUDA GPUs, or CPU interpreted)")
    capability = _capability(q)
    if p_mode == "fp8" and (capability is None or capability < (8, 9)):
        raise KernelError("p_mode 'fp8' needs an NVIDIA GPU with compute capability >= 8.9")


def _check_tensors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise KernelError(
                f"{name}: expected (batch, heads, seq, head_dim), got {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise KernelError(f"{name}: dtype {t.dtype} is not float16, bfloat16 or float32")
        if t.device != q.device:
            raise KernelError(f"{name}: on {t.device}, but q is on {q.device}")
    if k.shape != v.shape:
        raise KernelError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise KernelError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[3] not in HEAD_DIMS:
        raise KernelError(f"head_dim {q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if q.shape[1] % k.shape[1]:
        raise KernelError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if out is not None and out.shape != q.shape:
        raise KernelError(f"out: shape {tuple(out.shape)} differs from q {tuple(q.shape)}")


def tops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, seconds: float) -> float:
    """Attention throughput as papers report it: 4·B·H·N²·D operations (halved for causal)."""
    ops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return ops / seconds / 1e12

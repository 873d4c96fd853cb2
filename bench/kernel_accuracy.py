"""Accuracy of every attention mode against float64 attention, one table (the
inputs of tidal.inference_worker.kernels.reference).

    TRITON_INTERPRET=1 python bench/kernel_accuracy.py                 # CPU, ~2 min on 2 cores
    TRITON_INTERPRET=1 python bench/kernel_accuracy.py --emulate-fp8   # + fp8, interpreted
    python bench/kernel_accuracy.py --n 1024,8192                      # GPU

Relative L2 of the output over every element (fp16 inputs, B=1, H=2); the last column is a
PyTorch emulation of e4m3 P and V alone (correct rounding, exact scores). fp8 needs compute
capability 8.9 on a GPU; ``--emulate-fp8`` runs it in the CPU interpreter as if on Hopper, whose
float32 -> e4m3 cast drops the carry of a rounded-up mantissa, so those numbers overstate the
error (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tidal.inference_worker.kernels import attention as attention_module
from tidal.inference_worker.kernels import (
    int8_attention,
    reference_attention,
    relative_l2,
    triton_fp8_attention,
)
from tidal.inference_worker.kernels.reference import INPUT_KINDS, make_inputs

MODES = ("int8_rowblock", "int8_static", "fp16", "fp8")
FP8_MAX = 448.0
BLOCK_N = 128  # keys per P scale, as in the kernel


def emulated_fp8_p(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """What e4m3 P and V alone cost, with PyTorch's correctly rounded cast: exact float64
    scores, P scaled per row and key block to e4m3's range, V per channel (the fp8 P mode
    without its INT8 QK)."""
    d = q.shape[-1]
    scores = q.double() @ k.double().transpose(-1, -2) * d**-0.5
    if causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    v_scale = v.double().abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / FP8_MAX
    v8 = _e4m3(v.double() / v_scale) * v_scale
    out = torch.zeros_like(q, dtype=torch.float64)
    for start in range(0, k.shape[2], BLOCK_N):
        block = p[..., start : start + BLOCK_N]
        scale = block.amax(dim=-1, keepdim=True).clamp_min(1e-30) / FP8_MAX
        out += (_e4m3(block / scale) * scale) @ v8[..., start : start + BLOCK_N, :]
    return out / p.sum(dim=-1, keepdim=True)


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.float8_e4m3fn).double()


def measure(kind: str, n: int, d: int, causal: bool, device: str, fp8: bool) -> list[str]:
    q, k, v = make_inputs(kind, n, d)
    reference = reference_attention(q, k, v, causal, d**-0.5)
    q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
    cells = []
    for mode in MODES:
        if mode == "fp8" and not fp8:
            cells.append("-")
            continue
        out = int8_attention(q, k, v, causal=causal, p_mode=mode)
        assert isinstance(out, torch.Tensor)
        cells.append(f"{relative_l2(out.cpu(), reference):.2e}")
    if fp8:
        baseline = triton_fp8_attention(q, k, v, causal=causal)
        cells.append(f"{relative_l2(baseline.cpu(), reference):.2e}")
    else:
        cells.append("-")
    emulated = emulated_fp8_p(q.cpu().float(), k.cpu().float(), v.cpu().float(), causal)
    cells.append(f"{relative_l2(emulated, reference):.2e}")
    return cells


def _as_hopper(_: torch.Tensor) -> tuple[int, int]:
    """The capability the interpreter pretends to have with --emulate-fp8."""
    return 9, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="130,1024", help="comma-separated sequence lengths")
    parser.add_argument("--d", type=int, default=64, choices=(64, 128))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--kinds", default=",".join(INPUT_KINDS))
    parser.add_argument("--emulate-fp8", action="store_true", help="CPU interpreter only")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("without a GPU, set TRITON_INTERPRET=1")
    fp8 = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    if args.emulate_fp8:
        if device != "cpu":
            parser.error("--emulate-fp8 is for the CPU interpreter")
        attention_module._capability = _as_hopper  # type: ignore[assignment]
        fp8 = True
    print(f"device {device}, D={args.d}, {'causal' if args.causal else 'non-causal'}")
    print("| input | N | " + " | ".join(MODES) + " | FP8 baseline | e4m3 P+V, torch |")
    print("|---|---|" + "---|" * (len(MODES) + 2))
    for kind in args.kinds.split(","):
        for n in (int(x) for x in args.n.split(",")):
            cells = measure(kind, n, args.d, args.causal, device, fp8)
            print(f"| {kind} | {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

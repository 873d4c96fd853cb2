"""INT8 FlashAttention benchmark: every method side by side in one process on the same inputs.

    python bench/attention_bench.py --out $OUT            # the whole grid (GPU, ~10 min on H100)
    python bench/attention_bench.py --grid paper --quick   # a few points
    TRITON_INTERPRET=1 python bench/attention_bench.py --smoke   # CPU: checks the script runs

Methods: PyTorch SDPA pinned to its flash, cuDNN and memory-efficient backends (bf16), our Triton
FP16 fused attention, and ours in every P mode, kernel only and with quantization. TOPS =
4·B·H·N²·D / time (halved for causal), median of many runs (triton.testing.do_bench). Each of
our modes' relative L2 error against float64 attention (on one head) sits beside its speed.
Before timing, a chained int8 dot (Triton issue #3580: int8 dot -> int8 -> dot miscompiled on
some versions) is checked on the machine's Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tidal.inference_worker.kernels import (
    P_MODES,
    LaunchConfig,
    attention_quantized,
    int8_attention,
    quantize_inputs,
    tops,
    triton_fp8_attention,
    triton_fp16_attention,
)
from tidal.inference_worker.kernels.launch import autotune_space


@dataclass(frozen=True)
class Shape:
    grid: str
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool


def grids(quick: bool, smoke: bool) -> list[Shape]:
    """The benchmark grids: the paper's D=64; D=128 to 32k; a 70B tensor-parallel prefill shard."""
    if smoke:
        return [Shape("smoke", 1, 2, 2, 128, 64, False), Shape("smoke", 1, 4, 1, 128, 128, True)]
    seqs = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
    shapes = [Shape("paper D=64", 4, 32, 32, n, 64, False) for n in seqs]
    for n in [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768]:
        batch = max(1, 16384 // n)  # 16k tokens per batch, as FlashAttention's benchmarks
        for causal in (False, True):
            shapes.append(Shape("D=128", batch, 16, 16, n, 128, causal))
    for n in [4096, 32768] if quick else [4096, 8192, 16384, 32768]:
        shapes.append(Shape("70B TP8 prefill", 1, 8, 1, n, 128, True))
    return shapes


# -- timing -------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        median_ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        return float(median_ms) / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdpa(backend_name: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend_name]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
            )

    return run


# -- accuracy -----------------------------------------------------------------------------


def one_head_error(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> float:
    """Relative L2 of head 0 of batch 0 against float64 attention, in query chunks so a 32k
    sequence fits in memory."""
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = q[0, 0].double(), k[0, 0 // group].double(), v[0, 0 // group].double()
    scale = q.shape[-1] ** -0.5
    num = den = 0.0
    for start in range(0, qh.shape[0], 2048):
        rows = slice(start, min(start + 2048, qh.shape[0]))
        scores = qh[rows] @ kh.T * scale
        if causal:
            index = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(kh.shape[0], device=q.device) > index, -1e300)
        ref = torch.softmax(scores, dim=-1) @ vh
        num += float((out[0, 0, rows].double() - ref).norm() ** 2)
        den += float(ref.norm() ** 2)
    return float((num / den) ** 0.5)


def chained_int8_dot_ok(device: torch.device) -> bool:
    """Triton issue #3580: a second int8 dot fed by the int8 result of a first miscompiled."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit  # type: ignore[untyped-decorator]
    def chained(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
        r = tl.arange(0, N)
        tile = r[:, None] * N + r[None, :]
        first = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile), out_dtype=tl.int32)
        small = (first & 63).to(tl.int8)  # bit mask: same in Triton and torch for negatives
        tl.store(out_ptr + tile, tl.dot(small, tl.load(c_ptr + tile), out_dtype=tl.int32))

    n = 64
    a, b, c = (torch.randint(-8, 8, (n, n), dtype=torch.int8, device=device) for _ in range(3))
    out = torch.empty((n, n), dtype=torch.int32, device=device)
    chained[(1,)](a, b, c, out, N=n)
    first = (a.int().cpu() @ b.int().cpu()) & 63
    expected = first.to(torch.int8).int() @ c.int().cpu()
    return bool(torch.equal(out.cpu(), expected))


# -- the run ------------------------------------------------------------------------------


def autotuned(device: torch.device, head_dim: int, smoke: bool) -> LaunchConfig | None:
    """The fastest config of the Hopper set at one representative shape (None: defaults)."""
    if device.type != "cuda" or smoke or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    q = torch.randn(4, 32 if head_dim == 64 else 16, 8192, head_dim, device=device).half()
    operands = quantize_inputs(q, q, q)
    best: tuple[float, LaunchConfig] | None = None
    for config in autotune_space(head_dim):
        try:
            seconds = median_seconds(partial(attention_quantized, operands, config=config), device)
        except Exception:  # out of shared memory or registers: not a candidate
            continue
        if best is None or seconds < best[0]:
            best = (seconds, config)
    return best[1] if best else None


def measure(
    shape: Shape, device: torch.device, configs: dict[int, LaunchConfig | None]
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(
        shape.batch, shape.q_heads, shape.seq, shape.head_dim, device=device, dtype=dtype
    )
    k = torch.randn(
        shape.batch, shape.kv_heads, shape.seq, shape.head_dim, device=device, dtype=dtype
    )
    v = torch.randn_like(k)
    rows: list[dict[str, Any]] = []
    config = configs.get(shape.head_dim)

    def record(method: str, fn: Callable[[], Any], out: torch.Tensor | None) -> None:
        try:
            seconds = median_seconds(fn, device)
        except Exception as error:  # a backend that does not support this shape
            rows.append({**asdict(shape), "method": method, "error": str(error)[:120]})
            return
        s = shape
        rows.append({
            **asdict(shape), "method": method, "ms": seconds * 1e3,
            "tops": tops(s.batch, s.q_heads, s.seq, s.head_dim, s.causal, seconds),
            "rel_l2": one_head_error(out, q, k, v, s.causal) if out is not None else None,
        })  # fmt: skip

    backends = ("flash", "cudnn", "efficient") if device.type == "cuda" else ("math",)
    for name in backends:
        run = sdpa(name)
        try:
            out = run(q, k, v, shape.causal)
        except Exception as error:
            rows.append({**asdict(shape), "method": f"sdpa-{name}", "error": str(error)[:120]})
            continue
        record(f"sdpa-{name}", partial(run, q, k, v, shape.causal), out)
    qh, kh, vh = q.half(), k.half(), v.half()
    baseline = partial(triton_fp16_attention, qh, kh, vh, causal=shape.causal, config=config)
    record("triton-fp16", baseline, baseline())
    fp8_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8_ok:
        fp8 = partial(triton_fp8_attention, q, k, v, causal=shape.causal, config=config)
        record("triton-fp8", fp8, fp8())
    for mode in P_MODES:
        if mode == "fp8" and not fp8_ok:
            continue
        operands = quantize_inputs(q, k, v, p_mode=mode)
        out, _ = attention_quantized(operands, shape.causal, config=config)
        kernel = partial(attention_quantized, operands, shape.causal, config=config)
        full = partial(int8_attention, q, k, v, shape.causal, p_mode=mode, config=config)
        record(f"ours-{mode} kernel", kernel, out)
        record(f"ours-{mode} +quant", full, None)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| grid | B | Hq/Hkv | N | D | causal | method | ms | TOPS | rel. L2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        head = (f"| {r['grid']} | {r['batch']} | {r['q_heads']}/{r['kv_heads']} | "
                f"{r['seq']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | "
                f"{r['method']} |")  # fmt: skip
        if "error" in r:
            lines.append(f"{head} – | – | unsupported: {r['error']} |")
            continue
        err = f"{r['rel_l2']:.2e}" if r.get("rel_l2") is not None else ""
        lines.append(f"{head} {r['ms']:.3f} | {r['tops']:.0f} | {err} |")
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, str]:
    import triton  # noqa: PLC0415

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": str(os.cpu_count())}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--grid", choices=["all", "paper", "d128", "tp"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter ok)")
    parser.add_argument("--out", type=Path, help="write attention.md and attention.json here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print(
            "no GPU: only --smoke runs on CPU (with TRITON_INTERPRET=1); GPU numbers not measured"
        )
        return 2
    info = machine(device)
    info["chained int8 dot (triton #3580)"] = "ok" if chained_int8_dot_ok(device) else "MISCOMPILED"
    print(json.dumps(info), flush=True)
    wanted = {"all": None, "paper": "paper", "d128": "D=128", "tp": "70B"}[args.grid]
    shapes = [
        s for s in grids(args.quick, args.smoke) if wanted is None or s.grid.startswith(wanted)
    ]
    configs = {d: autotuned(device, d, args.smoke) for d in {s.head_dim for s in shapes}}
    info["autotuned"] = json.dumps({d: asdict(c) if c else "defaults" for d, c in configs.items()})
    rows: list[dict[str, Any]] = []
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {shape}", file=sys.stderr, flush=True)
        rows += measure(shape, device, configs)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python bench/attention_bench.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        (args.out / "attention.md").write_text(
            f"command: `{command}`\n\nmachine: `{json.dumps(info)}`\n\n{text}\n"
        )
        (args.out / "attention.json").write_text(
            json.dumps({"machine": info, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

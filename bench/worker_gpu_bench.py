"""The worker on one GPU, in one call: INT8 vs SDPA prefill attention at Llama shard shapes, and
ISO vs serial prefill with a same-GPU proxy for the all-reduce, plus the cost model's gains at
stated interconnect bandwidths.

    PYTHONPATH=. python bench/worker_gpu_bench.py --out "$OUT"      # on a GPU machine
    PYTHONPATH=. python bench/worker_gpu_bench.py --cpu-smoke       # checks the script, no GPU

Every ISO number from one GPU is labelled: "proxy" (the all-reduce replaced by a side-stream
device-to-device copy of the bytes a ring all-reduce moves: overlap and copy-engine
interference are real, NVLink/PCIe are not) or "modelled" (the cost model of
tidal.inference_worker.iso_split fed with compute measured here and R = bytes / bandwidth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from bench.environment import machine
from tidal.inference_worker.iso import measure_costs, prefill_iso
from tidal.inference_worker.iso_split import OpCosts, iso_time, serial_time
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.parallel.comm import NoopComm, ProxyComm
from tidal.inference_worker.weights.source import random_source

# Llama-3-8B's layer shape; 4 layers are enough for per-layer times.
LLAMA_8B = ModelSpec(
    architecture="llama", vocab_size=4096, hidden_size=4096, intermediate_size=14336, layers=4,
    heads=32, kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=500000.0, max_position=8192,
    tie_embeddings=True,
)  # fmt: skip
BANDWIDTHS_GBS = {"PCIe": 15.0, "A800 NVLink": 200.0, "H100 NVLink": 400.0}


def _bench(fn: Any) -> float:
    """Median seconds of ``fn`` on the GPU (triton's do_bench: warm-up, L2 flushes)."""
    import triton.testing  # noqa: PLC0415

    return float(triton.testing.do_bench(fn, warmup=25, rep=100)) / 1e3


def attention_rows(lengths: list[int]) -> list[dict[str, Any]]:
    """INT8 vs SDPA causal prefill attention for one sequence at each TP shard shape."""
    from tidal.inference_worker.kernels import int8_attention  # noqa: PLC0415

    rows = []
    for tp in (1, 2, 4):
        heads, kv_heads = LLAMA_8B.heads // tp, LLAMA_8B.kv_heads // tp
        for n in lengths:
            q = torch.randn(1, heads, n, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, n, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sdpa = _bench(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))  # fmt: skip
            int8 = _bench(lambda q=q, k=k, v=v: int8_attention(q, k, v, causal=True))
            rows.append({"tp": tp, "tokens": n, "sdpa_ms": sdpa * 1e3, "int8_ms": int8 * 1e3,
                         "speedup": sdpa / int8})  # fmt: skip
    return rows


def iso_rows(spec: ModelSpec, tp: int, lengths: list[int], device: str) -> list[dict[str, Any]]:
    """Serial vs ISO prefill of rank 0's shard, compute-only and with the proxy all-reduce, and
    the cost model's ISO gain at each stated bandwidth."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    source = random_source(spec, dtype=dtype)
    quiet = LlamaModel(spec, source, NoopComm(0, tp), dtype, device)
    proxy = None
    if device == "cuda":
        proxy = LlamaModel(spec, source, ProxyComm(0, tp, torch.device("cuda")), dtype, device)
    compute_costs = measure_costs(quiet)
    rows = []
    for n in lengths:
        row: dict[str, Any] = {"tp": tp, "tokens": n, "split": n // 2}
        for name, model in (("compute", quiet), ("proxy", proxy)):
            if model is not None:
                row |= _prefill_times(name, model, n, device)
        for label, gbs in BANDWIDTHS_GBS.items():
            row[f"modelled_gain_{label}"] = _modelled_gain(compute_costs, spec, tp, n, gbs, dtype)
        rows.append(row)
    return rows


def _prefill_times(name: str, model: LlamaModel, tokens: int, device: str) -> dict[str, float]:
    ids = torch.randint(0, model.spec.vocab_size, (tokens,), device=device)

    def serial() -> object:
        return model.forward(ids, model.new_cache(tokens), 0)

    def iso() -> object:
        return prefill_iso(model, ids, model.new_cache(tokens), tokens // 2)

    return {
        f"{name}_serial_ms": _time(serial, device) * 1e3,
        f"{name}_iso_ms": _time(iso, device) * 1e3,
    }


def _modelled_gain(
    costs: OpCosts, spec: ModelSpec, tp: int, tokens: int, gbs: float, dtype: torch.dtype
) -> float:
    """Serial over ISO time of the cost model, with R = ring all-reduce bytes / bandwidth."""
    bytes_per_token = spec.hidden_size * torch.finfo(dtype).bits / 8 * 2 * (tp - 1) / tp
    with_comm = OpCosts(
        costs.a_token, costs.a_pair, costs.f_token, 5e-6, bytes_per_token / (gbs * 1e9)
    )
    best = min(iso_time(with_comm, tokens, s, spec.layers) for s in range(64, tokens, 64))
    return serial_time(with_comm, tokens, spec.layers) / best


def _time(fn: Any, device: str) -> float:
    if device == "cuda":
        return _bench(fn)
    import time  # noqa: PLC0415

    fn()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, no kernel")
    args = parser.parse_args()
    with torch.inference_mode():
        if args.cpu_smoke:
            tiny = dataclasses.replace(
                LLAMA_8B, hidden_size=256, intermediate_size=512, heads=4, kv_heads=2,
                head_dim=64, layers=2,
            )  # fmt: skip
            result: dict[str, Any] = {"iso": iso_rows(tiny, 2, [128], "cpu")}
        else:
            result = {
                "device": torch.cuda.get_device_name(),
                "attention": attention_rows([1024, 4096, 8192]),
                "iso": [
                    row for tp in (2, 4) for row in iso_rows(LLAMA_8B, tp, [2048, 4096], "cuda")
                ],
            }
    result["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

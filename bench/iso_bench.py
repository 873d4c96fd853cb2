"""ISO prefill against serial prefill over gloo: how much of the exposed all-reduce time ISO hides.

    PYTHONPATH=. python bench/iso_bench.py [--tp 2] [--tokens 256,512,1024,2048] [--repeats 5]

Two CPU ranks (one thread each on a 2-core machine) run the same toy Llama stack (WORKER-scale:
8 layers, d 512, 8/4 heads, FFN 1536, float32, random weights) four ways, interleaved so the
machine's drift hits all of them alike: serial prefill; ISO at the split the chooser picks from
op times measured at start-up; and both again with a communicator that moves nothing
("compute-only": the same shard shapes, no all-reduce). Reported per prompt length, medians:

    η = (T_serial − T_ISO) / (T_serial − T_compute)   the share of exposed communication hidden
    chunking overhead = T_compute,ISO / T_compute,serial − 1

Labelled "CPU gloo": this says nothing about NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.environment import machine
from tidal.inference_worker.iso import measure_costs, prefill_iso
from tidal.inference_worker.iso_split import choose_split, exposed_share_hidden
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.parallel.comm import NoopComm
from tidal.inference_worker.parallel.launch import launch
from tidal.inference_worker.weights.source import random_source

SPEC = ModelSpec(
    architecture="llama", vocab_size=1024, hidden_size=512, intermediate_size=1536, layers=8,
    heads=8, kv_heads=4, head_dim=64, rms_eps=1e-5, rope_theta=10000.0, max_position=4096,
    tie_embeddings=True,
)  # fmt: skip


def _prefill_seconds(model: Any, ids: torch.Tensor, split: int | None) -> float:
    cache = model.new_cache(ids.shape[0])
    started = time.perf_counter()
    if split is None:
        model.forward(ids, cache, 0)
    else:
        prefill_iso(model, ids, cache, split)
    return time.perf_counter() - started


def _one_length(real: Any, quiet: Any, tokens: int, split: int, repeats: int) -> dict[str, Any]:
    """Medians of the four ways, run interleaved (the first round warms up)."""
    ids = torch.randint(0, SPEC.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1))
    ways = {"serial": (real, None), "iso": (real, split), "compute": (quiet, None),
            "compute_iso": (quiet, split)}  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats + 1):
        for name, (model, at) in ways.items():
            runs[name].append(_prefill_seconds(model, ids, at))
    medians = {f"{name}_s": statistics.median(times[1:]) for name, times in runs.items()}
    return {"tokens": tokens, "split": split, **medians}


def _rank(
    comm: Any, device: torch.device, lengths: list[int], repeats: int, half: bool
) -> dict[str, Any]:
    source = random_source(SPEC)
    real = LlamaModel(SPEC, source, comm)
    quiet = LlamaModel(SPEC, source, NoopComm(comm.rank, comm.world))
    costs = measure_costs(real)
    rows = []
    with torch.inference_mode():
        for tokens in lengths:
            choice = choose_split(costs, tokens, SPEC.layers, min_tokens=0)
            split = comm.broadcast_object(tokens // 2 if half else choice.split or tokens // 2)
            rows.append(_one_length(real, quiet, tokens, split, repeats))
    return {"rows": rows, "costs": costs.__dict__}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| S | split | serial ms | ISO ms | compute-only ms | compute-only ISO ms | η hidden "
        "| chunking overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["eta"] = exposed_share_hidden(r["serial_s"], r["iso_s"], r["compute_s"])
        r["chunking_overhead"] = r["compute_iso_s"] / r["compute_s"] - 1
        times = " | ".join(
            f"{r[k] * 1e3:.0f}" for k in ("serial_s", "iso_s", "compute_s", "compute_iso_s")
        )
        lines.append(
            f"| {r['tokens']} | {r['split']} | {times} | {r['eta']:.2f} "
            f"| {r['chunking_overhead']:+.1%} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", default="256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--split", choices=("chooser", "half"), default="chooser",
        help="the split chooser's point, or S/2",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    half = args.split == "half"
    rank0 = launch(_rank, args.tp, lengths, args.repeats, half, timeout=3600)[0]
    print(f"ISO vs serial prefill, TP={args.tp} over gloo (CPU), toy Llama {SPEC.layers} "
          f"layers, d {SPEC.hidden_size}:\n")  # fmt: skip
    print("\n".join(_table(rank0["rows"])))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = machine()
    (args.out / f"iso_gloo_{args.split}.json").write_text(
        json.dumps({"machine": stamp, **rank0}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

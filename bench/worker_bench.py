"""tidal's worker against transformers on the CPU: SmolLM2-135M-Instruct, batch 1, one process.

    PYTHONPATH=. python bench/worker_bench.py [--prompts 4] [--new-tokens 32] [--threads 2]

The same prompts (chat-rendered), greedy, a fixed number of new tokens (end of text ignored),
through `tidal.inference_worker` (the decoder `tidal worker generate` runs, SDPA, float32) and
through transformers' `generate` on its own GGUF load of the same file, interleaved prompt by
prompt. Prefill tokens/s is prompt tokens over the time to the first token; decode tokens/s is
the remaining tokens over the remaining time. llama.cpp through llama-cpp-python is not
compared here: it ships only as an sdist that builds llama.cpp from C++ source.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.environment import machine
from tidal.inference_worker.engine.params import SamplingParams
from tidal.inference_worker.generate import generate
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.weights.resolve import load_checkpoint, smollm2_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is tensor parallelism?",
    "Translate 'good morning' into German.",
]


def _transformers_model(path: Path) -> Any:
    import transformers  # noqa: PLC0415

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _theirs(model: Any, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of transformers: time to the first token, then the rest."""
    prompt = torch.tensor(ids)[None]
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        whole = time.perf_counter() - started
    return first, max(whole - first, 1e-9)


def _ours(model: LlamaModel, ids: list[int], new_tokens: int) -> tuple[float, float]:
    result = generate(
        model, ids, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    )
    return result.prefill_s, result.decode_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    checkpoint = load_checkpoint(str(path))
    ours = LlamaModel(checkpoint.spec, checkpoint.source, LocalComm())
    theirs = _transformers_model(path)
    prompts = [checkpoint.tokenizer.encode_chat([{"role": "user", "content": p}])
               for p in PROMPTS[: args.prompts]]  # fmt: skip
    _ours(ours, prompts[0], 4), _theirs(theirs, prompts[0], 4)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"tidal": [], "transformers": []}
    for ids in prompts:
        times["tidal"].append(_ours(ours, ids, args.new_tokens))
        times["transformers"].append(_theirs(theirs, ids, args.new_tokens))
    prompt_tokens = statistics.mean(len(ids) for ids in prompts)
    rows = {}
    for name, runs in times.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        rows[name] = {"prefill_tok_s": prompt_tokens / prefill,
                      "decode_tok_s": (args.new_tokens - 1) / decode}  # fmt: skip
    ratio = {k: rows["tidal"][k] / rows["transformers"][k] for k in rows["tidal"]}
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), batch 1, {args.threads} "
          f"threads, {len(prompts)} prompts of {prompt_tokens:.0f} tokens on average, "
          f"{args.new_tokens} new tokens:\n")  # fmt: skip
    print("| engine | prefill tok/s | decode tok/s |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} |")
    print(
        f"| tidal / transformers | {ratio['prefill_tok_s']:.2f}x | {ratio['decode_tok_s']:.2f}x |"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = machine()
    (args.out / "worker_cpu.json").write_text(
        json.dumps({"machine": stamp, "rows": rows, "ratio": ratio}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Offline throughput of tidal's serving engine against transformers at batch 1, on the CPU.

    PYTHONPATH=. python bench/engine_offline_bench.py [--sequences 32] [--threads 2] [--quick]

nano-vllm's ``bench.py`` scaled down to a 2-core CPU: SmolLM2-135M-Instruct (the bundled Q4_1
GGUF, dequantized to float32), SDPA attention, N sequences of random token ids (32-256 tokens)
each wanting 16-64 new tokens (greedy, end of text ignored), from a fixed seed. Every request
is submitted up front to tidal's :class:`LLMEngine` with ``max_num_seqs`` = c for each
concurrency c (1, 8, 32), and the engine is stepped until it is done: output tokens/s is the
output tokens over the wall time from the first ``add`` to the last token (total tokens/s counts
the prompt tokens too). transformers' ``generate`` runs the same prompts one at a time (batch
1, ``min_new_tokens = max_new_tokens``, ``do_sample=False``) on its own GGUF load of the same
file, in slices between the engine's runs, so load on the shared machine falls on both. The
target is tidal at 32 concurrent sequences >= 4x transformers' output tokens/s.

Check: the first 8 greedy tokens of the first 2 prompts, tidal (every concurrency) against
transformers; a mismatch is reported, not fatal. Each engine run also splits its wall time into
the model's forward passes (prefill-carrying steps and decode-only steps) and the engine's own
host work (scheduling, sampling, detokenization), and every run records its process's CPU time
("cores busy" = CPU s / wall s: well under --threads means other load on the machine took the
cores, and the run's numbers say little). ``--quick`` (8 sequences, 8-16 new tokens,
concurrency 1, 4, 8) is a smoke run; it cannot evaluate the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.environment import machine
from tidal.inference_worker.engine.build import EngineOptions, build_runner
from tidal.inference_worker.engine.engine import EngineConfig, LLMEngine
from tidal.inference_worker.engine.params import SamplingParams, TokenizerLike
from tidal.inference_worker.engine.runner import ModelRunner, StepWork
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.weights.resolve import smollm2_gguf

SEED = 0
TOKEN_IDS = (0, 10_000)  # nano-vllm's range of random prompt ids
PROMPT_LEN = (32, 256)
OUTPUT_LEN = (16, 64)
QUICK_OUTPUT_LEN = (8, 16)
CONCURRENCY = (1, 8, 32)
QUICK_CONCURRENCY = (1, 4, 8)
QUICK_SEQUENCES = 8
TARGET_CONCURRENCY, TARGET_RATIO = 32, 4.0
CHECK_PROMPTS, CHECK_TOKENS = 2, 8


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    outputs: list[int]  # new tokens per prompt

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.outputs)


def make_workload(
    sequences: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> Workload:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(*TOKEN_IDS) for _ in range(rng.randint(*prompt_len))]
        for _ in range(sequences)
    ]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(sequences)])


@dataclass
class Run:
    """One configuration's totals: wall_s is the time spent generating (for transformers, the
    sum of its ``generate`` calls), cpu_s this process's CPU time over it (all threads): well
    under threads x wall_s means the machine's other load took the cores."""

    name: str
    concurrency: int
    wall_s: float
    cpu_s: float
    prompt_tokens: int
    output_tokens: int
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "output_tok_s": self.output_tok_s,
            "total_tok_s": self.total_tok_s,
            **({"steps": self.steps} if self.steps else {}),
        }


def progress(run: Run) -> None:
    print(
        f"[{run.name} c={run.concurrency}] {run.output_tokens} output tokens in "
        f"{run.wall_s:.1f} s: {run.output_tok_s:.1f} output tok/s, "
        f"{run.total_tok_s:.1f} total tok/s, {run.cpu_s / run.wall_s:.2f} cores busy",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------- tidal's engine


class StepClock:
    """Times the runner's forward pass of every step: (segments, carries a prompt chunk, s)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.records: list[tuple[int, bool, float]] = []
        forward = runner.execute

        def timed(work: StepWork) -> torch.Tensor | None:
            started = time.perf_counter()
            logits = forward(work)
            prefill = any(s.count > 1 for s in work.segments)
            self.records.append((len(work.segments), prefill, time.perf_counter() - started))
            return logits

        runner.execute = timed  # type: ignore[method-assign]

    def summary(self, wall_s: float) -> dict[str, float]:
        """Where an engine run's wall time went; clears the records."""
        decode = [(n, s) for n, prefill, s in self.records if not prefill]
        prefill = [s for _, prefill, s in self.records if prefill]
        prefill_s, decode_s = sum(prefill), sum(s for _, s in decode)
        self.records = []
        return {
            "prefill_steps": len(prefill),
            "prefill_steps_forward_s": prefill_s,
            "decode_steps": len(decode),
            "decode_steps_forward_s": decode_s,
            "decode_step_ms": 1e3 * decode_s / max(len(decode), 1),
            "decode_batch_mean": sum(n for n, _ in decode) / max(len(decode), 1),
            "host_s": wall_s - prefill_s - decode_s,
        }


def engine_parts() -> tuple[ModelRunner, TokenizerLike, EngineConfig]:
    """What ``build_engine`` builds (one rank, float32, SDPA, the CPU's default KV budget),
    kept apart so each concurrency gets a fresh engine (and prefix cache) on one loaded model."""
    options = EngineOptions(model_uri=str(smollm2_gguf()), dtype="float32", attention="sdpa")
    runner, checkpoint, config = build_runner(options, LocalComm(), "cpu")
    return runner, checkpoint.tokenizer, config


def run_engine(
    runner: ModelRunner,
    tokenizer: TokenizerLike,
    config: EngineConfig,
    clock: StepClock,
    workload: Workload,
    concurrency: int,
) -> tuple[Run, list[list[int]]]:
    """All of ``workload`` submitted at once to an engine of ``max_num_seqs = concurrency``."""
    engine = LLMEngine(runner, tokenizer, dataclasses.replace(config, max_num_seqs=concurrency))
    tokens: dict[str, list[int]] = {}
    clock.records = []
    started, cpu = time.perf_counter(), time.process_time()
    for i, (prompt, new) in enumerate(zip(workload.prompts, workload.outputs, strict=True)):
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        engine.add(str(i), prompt, params)
        tokens[str(i)] = []
    while engine.has_work:
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    out = [tokens[str(i)] for i in range(len(workload.prompts))]
    steps = clock.summary(wall)
    run = Run("tidal", concurrency, wall, cpu, workload.prompt_tokens, sum(map(len, out)), steps)
    return run, out


# ---------------------------------------------------------------------- transformers


def transformers_model(path: Path) -> Any:
    """worker_bench's load of the GGUF file, with float32 and SDPA spelt out."""
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # no pad notice
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model


def transformers_generate(
    model: Any, prompt: list[int], new_tokens: int
) -> tuple[float, float, list[int]]:
    """(seconds, CPU seconds, new token ids) of one greedy batch-1 ``generate``."""
    ids = torch.tensor(prompt)[None]
    with torch.inference_mode():
        started, cpu = time.perf_counter(), time.process_time()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, [int(t) for t in out[0, len(prompt) :]]


# ---------------------------------------------------------------------- the plan


def slices(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` nearly equal consecutive slices."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def run_all(
    workload: Workload,
    concurrencies: Sequence[int],
    engine_run: Callable[[int], tuple[Run, Any]],
    hf_model: Any,
) -> tuple[list[Run], Run, dict[int, list[list[int]]], list[list[int]]]:
    """transformers' prompts in slices around the engine's runs: hf, c1, hf, c8, hf, c32, hf."""
    n = len(workload.prompts)
    hf_seconds: list[float] = [0.0] * n
    hf_cpu: list[float] = [0.0] * n
    hf_tokens: list[list[int]] = [[] for _ in range(n)]
    runs: list[Run] = []
    engine_tokens: dict[int, list[list[int]]] = {}
    parts = slices(n, len(concurrencies) + 1)
    for index, part in enumerate(parts):
        for i in part:
            hf_seconds[i], hf_cpu[i], hf_tokens[i] = transformers_generate(
                hf_model, workload.prompts[i], workload.outputs[i]
            )
        if part:
            done = sum(hf_seconds[i] for i in part)
            print(
                f"[transformers batch 1] prompts {part.start}-{part.stop - 1} "
                f"({len(parts[: index + 1])}/{len(parts)} slices) in {done:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        if index < len(concurrencies):
            run, engine_tokens[concurrencies[index]] = engine_run(concurrencies[index])
            runs.append(run)
            progress(run)
    hf = Run(
        "transformers",
        1,
        sum(hf_seconds),
        sum(hf_cpu),
        workload.prompt_tokens,
        sum(map(len, hf_tokens)),
    )
    progress(hf)
    return runs, hf, engine_tokens, hf_tokens


def check(
    engine_tokens: dict[int, list[list[int]]], hf_tokens: list[list[int]], workload: Workload
) -> list[dict[str, Any]]:
    """The first CHECK_TOKENS greedy tokens of the first CHECK_PROMPTS prompts, per concurrency;
    also whether every request got exactly the tokens it asked for."""
    results = []
    for concurrency, tokens in engine_tokens.items():
        short = [
            i for i, (t, n) in enumerate(zip(tokens, workload.outputs, strict=True)) if len(t) != n
        ]
        for i in range(min(CHECK_PROMPTS, len(tokens))):
            ours, theirs = tokens[i][:CHECK_TOKENS], hf_tokens[i][:CHECK_TOKENS]
            first = next(
                (k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
            )
            match = ours == theirs
            results.append(
                {
                    "concurrency": concurrency,
                    "prompt": i,
                    "match": match,
                    "first_mismatch": first,
                    "tidal": ours,
                    "transformers": theirs,
                    "wrong_lengths": short,
                }
            )
            if not match or short:
                print(
                    f"MISMATCH c={concurrency} prompt {i}: tidal {ours} transformers {theirs}"
                    f" (first differs at {first}); wrong lengths: {short}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# ---------------------------------------------------------------------- report


def table(runs: list[Run], hf: Run) -> str:
    lines = [
        "| engine | concurrent | wall s | output tok/s | total tok/s | output ratio | cores busy |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in [hf, *runs]:
        ratio = run.output_tok_s / hf.output_tok_s
        lines.append(
            f"| {run.name} | {run.concurrency} | {run.wall_s:.1f} | "
            f"{run.output_tok_s:.1f} | {run.total_tok_s:.1f} | {ratio:.2f}x | "
            f"{run.cpu_s / run.wall_s:.2f} |"
        )
    return "\n".join(lines)


def target(runs: list[Run], hf: Run) -> dict[str, Any]:
    at = next((r for r in runs if r.concurrency == TARGET_CONCURRENCY), None)
    ratio = None if at is None else at.output_tok_s / hf.output_tok_s
    return {
        "concurrency": TARGET_CONCURRENCY,
        "needed": TARGET_RATIO,
        "ratio": ratio,
        "met": None if ratio is None else ratio >= TARGET_RATIO,
    }


def report(
    args: argparse.Namespace,
    runs: list[Run],
    hf: Run,
    goal: dict[str, Any],
    checks: list[dict[str, Any]],
) -> None:
    print(
        f"\nSmolLM2-135M-Instruct (Q4_1 GGUF as float32, SDPA), {args.threads} threads, "
        f"{args.sequences} random prompts of {PROMPT_LEN[0]}-{PROMPT_LEN[1]} tokens, "
        f"{args.output_len[0]}-{args.output_len[1]} new tokens each (greedy, eos ignored):\n"
    )
    print(table(runs, hf))
    verdict = "not run" if goal["met"] is None else ("met" if goal["met"] else "missed")
    ratio = "-" if goal["ratio"] is None else f"{goal['ratio']:.2f}x"
    print(
        f"\ntarget: tidal at {TARGET_CONCURRENCY} sequences >= {TARGET_RATIO:.0f}x "
        f"transformers batch 1: {ratio} ({verdict})"
    )
    matched = sum(c["match"] and not c["wrong_lengths"] for c in checks)
    print(
        f"check: {matched}/{len(checks)} (concurrency, prompt) pairs agree with transformers "
        f"on the first {CHECK_TOKENS} greedy tokens"
    )


def describe(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sequences": args.sequences,
        "seed": args.seed,
        "token_ids": TOKEN_IDS,
        "prompt_len": PROMPT_LEN,
        "output_len": args.output_len,
        "prompt_tokens": workload.prompt_tokens,
        "output_tokens": workload.output_tokens,
        "prompt_lengths": [len(p) for p in workload.prompts],
        "output_lengths": workload.outputs,
    }


def command() -> str:
    """The command line as typed (with its PYTHONPATH, if any)."""
    path = os.environ.get("PYTHONPATH")
    env = f"PYTHONPATH={shlex.quote(path)} " if path else ""
    return env + shlex.join(sys.orig_argv)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=None, help="default 32 (--quick: 8)")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=None,
        help="default 1,8,32 (--quick: 1,4,8)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_offline.json"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 sequences, 8-16 new tokens, concurrency 1,4,8",
    )
    args = parser.parse_args(argv)
    if args.sequences is None:
        args.sequences = QUICK_SEQUENCES if args.quick else 32
    if args.concurrency is None:
        args.concurrency = list(QUICK_CONCURRENCY if args.quick else CONCURRENCY)
    args.output_len = QUICK_OUTPUT_LEN if args.quick else OUTPUT_LEN
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    workload = make_workload(args.sequences, PROMPT_LEN, args.output_len, args.seed)
    runner, tokenizer, config = engine_parts()
    clock = StepClock(runner)
    hf_model = transformers_model(smollm2_gguf())
    warm = make_workload(2, (16, 32), (4, 4), args.seed + 1)
    run_engine(runner, tokenizer, config, clock, warm, 2)
    transformers_generate(hf_model, warm.prompts[0], 4)
    print(
        f"{args.sequences} sequences, {workload.prompt_tokens} prompt and "
        f"{workload.output_tokens} output tokens, {args.threads} threads",
        file=sys.stderr,
        flush=True,
    )

    def engine_run(concurrency: int) -> tuple[Run, list[list[int]]]:
        return run_engine(runner, tokenizer, config, clock, workload, concurrency)

    load_before = os.getloadavg()
    runs, hf, engine_tokens, hf_tokens = run_all(workload, args.concurrency, engine_run, hf_model)
    checks = check(engine_tokens, hf_tokens, workload)
    goal = target(runs, hf)
    report(args, runs, hf, goal, checks)
    result = {
        "benchmark": "engine_offline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command(),
        "machine": {**machine(), "threads": args.threads},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "model": {
            "file": smollm2_gguf().name,
            "dtype": "float32",
            "attention": "sdpa",
            "transformers_dtype": str(hf_model.dtype),
            "transformers_attention": hf_model.config._attn_implementation,
        },
        "engine": dataclasses.asdict(config) | {"max_num_seqs": "= concurrency"},
        "workload": describe(workload, args),
        "runs": [hf.row(), *(r.row() for r in runs)],
        "ratios": {str(r.concurrency): r.output_tok_s / hf.output_tok_s for r in runs},
        "target": goal,
        "check": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

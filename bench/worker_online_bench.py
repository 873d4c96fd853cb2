"""Online serving benchmark of ``tidal worker serve``: Poisson arrivals of Azure-shaped requests.

    PYTHONPATH=. python bench/worker_online_bench.py [--rates 0.5,1,2] [--requests 64]
        [--max-concurrency 64] [--trace PATH] [--quick] [--out bench/results/worker_online.json]

``vllm bench serve``'s metric set, scaled to a 2-core CPU. The benchmark starts ``tidal worker
serve`` (the bundled SmolLM2-135M-Instruct GGUF, float32, ``--max-model-len 2048``) on 127.0.0.1
and a free port, waits for ``/health`` to answer 200, sends one warm-up request, then for each
rate sends --requests streamed ``/v1/completions`` requests at Poisson arrivals (seeded).

Request shapes come from the Azure LLM conversation trace (Patel et al., ISCA 2024; CSV with
TIMESTAMP,ContextTokens,GeneratedTokens): --requests rows sampled with a fixed seed (the same
rows for every rate), both lengths divided by one scale factor (the trace's median context over
128, so the median prompt is about 128 tokens), prompts clamped to [8, 1024] tokens and outputs
to [4, 128]. A prompt is a list of random token ids in [100, 10000) (fresh for every rate, so the
prefix cache has nothing to share), ``max_tokens`` its output length, ``ignore_eos``,
``temperature`` 0, ``stream`` with ``stream_options.include_usage``.

At most --max-concurrency requests are in flight (an asyncio.Semaphore); as in vLLM, a request's
clock starts when it gets a slot (the wait for one is recorded apart). Per request: TTFT (send to
the first SSE chunk with text), inter-token latencies (gaps between chunks with text: a chunk
may carry more than one token), TPOT ((E2E - TTFT) / (tokens - 1), tokens from the usage chunk),
E2E latency; an error is a non-200 answer, an error event, a stream without usage or [DONE], or
a broken connection (expected 0). Per rate: throughput over the time from the first send to the
last answer, percentiles, the worker's own /metrics counters before and after (a cross-check:
its finished requests and generated tokens must equal the client's) and the server's CPU time
("cores busy" = server CPU s / wall s; the client and other tenants share the same two cores).
At the end the server gets SIGTERM and must exit 0. ``--quick`` (12 requests at 1 req/s) is a
smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.environment import machine

SEED = 0
TRACE = Path("../shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")
MODEL = "smollm2"  # the bundled GGUF; also the served model name
SERVER_FLAGS = ("--model", MODEL, "--dtype", "float32", "--max-model-len", "2048")
TOKEN_IDS = (100, 10_000)
TARGET_MEDIAN_PROMPT = 128
PROMPT_CLAMP = (8, 1024)
OUTPUT_CLAMP = (4, 128)
RATES = (0.5, 1.0, 2.0)
REQUESTS = 64
QUICK_RATES, QUICK_REQUESTS = (1.0,), 12
HEALTH_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 1800.0
EXIT_TIMEOUT_S = 90.0  # the server's drain (30 s grace) and exit
LOG_TAIL_LINES = 40
COUNTERS = (
    "tidal_request_success_total",
    "tidal_generation_tokens_total",
    "tidal_prompt_tokens_total",
    "tidal_num_preemptions_total",
    "tidal_prefix_cache_queries_total",
    "tidal_prefix_cache_hits_total",
    "tidal_time_to_first_token_seconds_sum",
    "tidal_time_to_first_token_seconds_count",
    "tidal_request_queue_time_seconds_sum",
    "tidal_e2e_request_latency_seconds_sum",
)


# ---------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Shape:
    prompt_len: int
    output_len: int
    trace_context: int
    trace_generated: int


@dataclass(frozen=True)
class Scaling:
    factor: float
    trace_rows: int
    trace_median_context: float
    trace_median_generated: float

    def describe(self) -> str:
        return (
            f"trace lengths / {self.factor:.2f} (trace median context "
            f"{self.trace_median_context:.0f} -> {TARGET_MEDIAN_PROMPT}), prompts clamped to "
            f"{list(PROMPT_CLAMP)}, outputs to {list(OUTPUT_CLAMP)}"
        )


def read_trace(path: Path) -> list[tuple[int, int]]:
    """(ContextTokens, GeneratedTokens) of every row."""
    with path.open(newline="") as f:
        return [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]


def clamp(value: float, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], round(value)))


def scaling(rows: list[tuple[int, int]]) -> Scaling:
    context = statistics.median(c for c, _ in rows)
    generated = statistics.median(g for _, g in rows)
    return Scaling(context / TARGET_MEDIAN_PROMPT, len(rows), context, generated)


def sample_shapes(rows: list[tuple[int, int]], scale: Scaling, n: int, seed: int) -> list[Shape]:
    picked = random.Random(seed).sample(rows, n)
    return [
        Shape(clamp(c / scale.factor, PROMPT_CLAMP), clamp(g / scale.factor, OUTPUT_CLAMP), c, g)
        for c, g in picked
    ]


def request_body(shape: Shape, rng: random.Random) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": [rng.randrange(*TOKEN_IDS) for _ in range(shape.prompt_len)],
        "max_tokens": shape.output_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request is sent: Poisson, the first at 0."""
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


# ---------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "tidal.cli", "worker", "serve", "--host", "127.0.0.1",
            f"--port={port}", *SERVER_FLAGS]  # fmt: skip


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> float:
    """Seconds until /health answered 200; exits if the server dies or never gets there."""
    started = time.monotonic()
    while time.monotonic() - started < HEALTH_TIMEOUT_S:
        if process.poll() is not None:
            sys.exit(f"error: the worker exited with {process.returncode} while loading")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.3)
    sys.exit(f"error: the worker was not healthy after {HEALTH_TIMEOUT_S:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM, then the exit status (killed after EXIT_TIMEOUT_S)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"exit_code": process.wait(), "killed": True, "exit_0": False}
    return {"exit_code": code, "killed": False, "exit_0": code == 0,
            "seconds_to_exit": time.monotonic() - started}  # fmt: skip


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]
    command: list[str]


@contextlib.contextmanager
def running_server(log_path: Path) -> Iterator[Server]:
    """The server on a free loopback port, its output in ``log_path``; killed if still alive."""
    port = free_port()
    command = server_command(port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Server(f"http://127.0.0.1:{port}", process, command)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def server_cpu_s(pid: int) -> float | None:
    """The process's user + system CPU seconds (Linux), None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    """COUNTERS from /metrics, each summed over its label sets."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[1]
        if name in totals:
            totals[name] += float(value)
    return totals


def log_summary(log_path: Path) -> dict[str, Any]:
    lines = log_path.read_text(errors="replace").splitlines()
    flagged = [line for line in lines if any(w in line for w in ("ERROR", "WARNING", "Traceback"))]
    return {"path": str(log_path), "lines": len(lines), "flagged": flagged[:20],
            "tail": lines[-LOG_TAIL_LINES:]}  # fmt: skip


# ---------------------------------------------------------------------- one request


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds."""

    prompt_len: int
    expected_tokens: int
    sent_s: float = 0.0  # when its clock started, seconds after the rate's first send
    wait_s: float = 0.0  # for a concurrency slot, before the clock starts
    output_tokens: int = 0  # the usage chunk's completion_tokens
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class StreamReader:
    """Folds a completions stream's ``data:`` lines into an :class:`Outcome`."""

    def __init__(self, outcome: Outcome, started: float) -> None:
        self.outcome, self.started = outcome, started
        self.last_text: float | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False

    def line(self, line: str, now: float) -> None:
        if not line.startswith("data: "):
            return
        data = line[len("data: ") :]
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self.outcome.error = f"error event: {json.dumps(chunk['error'])[:300]}"
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            if self.last_text is None:
                self.outcome.ttft_s = now - self.started
            else:
                self.outcome.itl_s.append(now - self.last_text)
            self.last_text = now

    def finish(self, now: float) -> None:
        self.outcome.e2e_s = now - self.started
        if self.usage is not None:
            self.outcome.output_tokens = int(self.usage["completion_tokens"])
        if self.outcome.error is None and (self.usage is None or not self.done):
            self.outcome.error = "the stream ended without usage and [DONE]"


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], out: Outcome) -> None:
    started = time.perf_counter()
    reader = StreamReader(out, started)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                out.error = f"HTTP {reply.status_code}: {text[:300]}"
                return
            async for line in reply.aiter_lines():
                reader.line(line, time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as error:
        out.error = f"{type(error).__name__}: {error}"
        return
    reader.finish(time.perf_counter())


async def bounded(
    slots: asyncio.Semaphore,
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    shape: Shape,
    rate_started: float,
) -> Outcome:
    out = Outcome(shape.prompt_len, shape.output_len)
    asked = time.perf_counter()
    async with slots:
        now = time.perf_counter()
        out.sent_s, out.wait_s = now - rate_started, now - asked
        await send(client, url, body, out)
    return out


async def run_rate(
    url: str, bodies: list[dict[str, Any]], shapes: list[Shape], send_at: list[float], limit: int
) -> tuple[list[Outcome], float]:
    """Every request at its arrival time; (outcomes, seconds from the first send to the last
    answer)."""
    slots = asyncio.Semaphore(limit)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        tasks = []
        for body, shape, at in zip(bodies, shapes, send_at, strict=True):
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            request = bounded(slots, client, url, body, shape, started)
            tasks.append(asyncio.create_task(request))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - started


# ---------------------------------------------------------------------- per rate


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, mean and max, in milliseconds."""
    ms = [v * 1e3 for v in values]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else None,
            "max_ms": max(ms) if ms else None}  # fmt: skip


def summarize(
    rate: float,
    outcomes: list[Outcome],
    duration: float,
    worker: dict[str, float],
    cpu_s: float | None,
) -> dict[str, Any]:
    good = [o for o in outcomes if o.ok]
    output_tokens = sum(o.output_tokens for o in good)
    prompt_tokens = sum(o.prompt_len for o in good)
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "rate_req_s": rate,
        "requests": len(outcomes),
        "completed": len(good),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:10],
        "wrong_lengths": sum(o.output_tokens != o.expected_tokens for o in good),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput_req_s": len(good) / duration,
        "output_throughput_tok_s": output_tokens / duration,
        "total_token_throughput_tok_s": (prompt_tokens + output_tokens) / duration,
        "ttft": spread([o.ttft_s for o in good if o.ttft_s is not None]),
        "tpot": spread([t for o in good if (t := o.tpot_s) is not None]),
        "itl": spread([gap for o in good for gap in o.itl_s]),
        "e2e": spread([o.e2e_s for o in good if o.e2e_s is not None]),
        "client_wait": spread([o.wait_s for o in outcomes]),
        "worker_metrics_delta": worker,
        "cross_check": {
            "finished_requests": worker["tidal_request_success_total"] == len(good),
            "generated_tokens": worker["tidal_generation_tokens_total"] == output_tokens,
        },
        "server_cpu_s": cpu_s,
        "server_cores_busy": None if cpu_s is None else cpu_s / duration,
        "requests_detail": [asdict(o) | {"tpot_s": o.tpot_s} for o in outcomes],
    }


def measure_rate(
    url: str,
    pid: int,
    shapes: list[Shape],
    rate: float,
    index: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}:{index}")  # fresh ids per rate: no prefix to share
    bodies = [request_body(s, rng) for s in shapes]
    send_at = arrivals(len(shapes), rate, rng)
    print(f"[rate {rate:g} req/s] sending {len(shapes)} requests over ~{send_at[-1]:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    before, cpu_before, load = scrape(url), server_cpu_s(pid), os.getloadavg()
    outcomes, duration = asyncio.run(run_rate(url, bodies, shapes, send_at, args.max_concurrency))
    after, cpu_after = scrape(url), server_cpu_s(pid)
    worker = {k: after[k] - before[k] for k in COUNTERS}
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    row = summarize(rate, outcomes, duration, worker, cpu)
    row["load_average"] = {"before": load, "after": os.getloadavg()}
    progress(row)
    return row


def progress(row: dict[str, Any]) -> None:
    print(
        f"[rate {row['rate_req_s']:g} req/s] {row['completed']}/{row['requests']} done, "
        f"{row['errors']} errors in {row['duration_s']:.1f} s: "
        f"{row['request_throughput_req_s']:.2f} req/s, {row['output_throughput_tok_s']:.1f} "
        f"output tok/s, TTFT p50 {fmt(row['ttft']['p50_ms'])} ms, ITL p50 "
        f"{fmt(row['itl']['p50_ms'])} ms, preemptions "
        f"{row['worker_metrics_delta']['tidal_num_preemptions_total']:.0f}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rate req/s | done | errors | duration s | req/s | output tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | TPOT p50 / p99 ms | E2E p50 / p99 s | preemptions | "
        "server cores busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e2e = {k: None if v is None else v / 1e3 for k, v in r["e2e"].items()}
        lines.append(
            f"| {r['rate_req_s']:g} | {r['completed']}/{r['requests']} | {r['errors']} | "
            f"{r['duration_s']:.1f} | {r['request_throughput_req_s']:.2f} | "
            f"{r['output_throughput_tok_s']:.1f} | "
            f"{fmt(r['ttft']['p50_ms'])} / {fmt(r['ttft']['p99_ms'])} | "
            f"{fmt(r['itl']['p50_ms'])} / {fmt(r['itl']['p99_ms'])} | "
            f"{fmt(r['tpot']['p50_ms'])} / {fmt(r['tpot']['p99_ms'])} | "
            f"{fmt(e2e['p50_ms'], 1)} / {fmt(e2e['p99_ms'], 1)} | "
            f"{r['worker_metrics_delta']['tidal_num_preemptions_total']:.0f} | "
            f"{fmt(r['server_cores_busy'], 2)} |"
        )
    return "\n".join(lines)


def command() -> str:
    """The command line as typed (with its PYTHONPATH, if any)."""
    path = os.environ.get("PYTHONPATH")
    env = f"PYTHONPATH={shlex.quote(path)} " if path else ""
    return env + shlex.join(sys.orig_argv)


def warm_up(url: str) -> None:
    """One short request, not measured, so the first rate pays no first-call costs."""
    body = request_body(Shape(16, 4, 0, 0), random.Random(f"{SEED}:warm"))
    body["stream"] = False
    del body["stream_options"]
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    if reply.status_code != 200:
        sys.exit(f"error: the warm-up request failed: HTTP {reply.status_code}: {reply.text}")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        type=lambda s: [float(r) for r in s.split(",")],
        default=None,
        help="Poisson arrival rates, req/s (default 0.5,1,2; --quick: 1)",
    )
    parser.add_argument("--requests", type=int, default=None, help="per rate (default 64)")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker_online.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 requests at 1 req/s")
    args = parser.parse_args(argv)
    if args.rates is None:
        args.rates = list(QUICK_RATES if args.quick else RATES)
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else REQUESTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if not args.trace.is_file():
        sys.exit(
            f"error: the Azure conversation trace is not at {args.trace} "
            "(AzureLLMInferenceTrace_conv.csv of Azure/AzurePublicDataset); "
            "pass its path with --trace"
        )
    rows = read_trace(args.trace)
    scale = scaling(rows)
    shapes = sample_shapes(rows, scale, args.requests, args.seed)
    print(f"{args.requests} requests per rate, {scale.describe()}", file=sys.stderr, flush=True)
    log_path = Path(tempfile.mkdtemp(prefix="worker_online_")) / "serve.log"
    with running_server(log_path) as server:
        load_s = wait_healthy(server.url, server.process)
        print(f"worker healthy after {load_s:.1f} s at {server.url}", file=sys.stderr, flush=True)
        warm_up(server.url)
        results = [
            measure_rate(server.url, server.process.pid, shapes, rate, i, args)
            for i, rate in enumerate(args.rates)
        ]
        shutdown = stop(server.process)
    print(
        f"\ntidal worker serve, SmolLM2-135M-Instruct (Q4_1 GGUF as float32), streamed "
        f"/v1/completions, {args.requests} requests per rate at most {args.max_concurrency} in "
        f"flight; shapes from {args.trace.name}: {scale.describe()}:\n"
    )
    print(table(results))
    print(f"\nserver: exit code {shutdown['exit_code']} after SIGTERM"
          f"{' (killed: it did not exit)' if shutdown['killed'] else ''}")  # fmt: skip
    result = {
        "benchmark": "worker_online",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command(),
        "machine": machine(),
        "server": {
            "command": shlex.join(server.command),
            "seconds_to_healthy": load_s,
            "shutdown": shutdown,
            "log": log_summary(log_path),
        },
        "workload": {
            "trace": str(args.trace),
            "scaling": asdict(scale)
            | {
                "description": scale.describe(),
                "target_median_prompt": TARGET_MEDIAN_PROMPT,
                "prompt_clamp": PROMPT_CLAMP,
                "output_clamp": OUTPUT_CLAMP,
            },
            "seed": args.seed,
            "requests_per_rate": args.requests,
            "max_concurrency": args.max_concurrency,
            "token_ids": TOKEN_IDS,
            "prompt_tokens": sum(s.prompt_len for s in shapes),
            "output_tokens": sum(s.output_len for s in shapes),
            "shapes": [asdict(s) for s in shapes],
        },
        "rates": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if shutdown["exit_0"] and not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The real model behind the real commands: ``tidal worker serve`` with SmolLM2 on a loopback
port (chat, completions, streaming, concurrent requests batched by the engine, metrics,
SIGTERM), and ``tidal worker batch`` stopped mid-shard by SIGTERM and resumed.

Each answer is checked against the model's own one-sequence greedy decode (``LlamaModel``
without the engine), so batching, paging and the prefix cache must change nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch

from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.parallel.launch import free_port
from tidal.inference_worker.weights.resolve import Checkpoint

TIDAL = [sys.executable, "-m", "tidal.cli", "worker"]
ENGINE_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB"]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "What is 2 + 2?",
    "Name a planet.",
    "Say hello in Spanish.",
]


def greedy_text(model: LlamaModel, checkpoint: Checkpoint, question: str, tokens: int) -> str:
    """The reference answer: one sequence, no engine, stopped at end-of-text like the server."""
    tokenizer = checkpoint.tokenizer
    ids = tokenizer.encode_chat([{"role": "user", "content": question}])
    out = model.greedy(torch.tensor(ids), tokens)
    eos = set(tokenizer.eos_token_ids)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return tokenizer.decode(out[:cut])


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the worker exited while loading"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the worker never became healthy")


@pytest.fixture(scope="module")
def server(
    smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")
    process = subprocess.Popen(
        [*TIDAL, "serve", f"--port={port}", "--host", "127.0.0.1", "--model", str(smollm2_path),
         "--served-model-name", "smol", *ENGINE_FLAGS],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def chat(url: str, question: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "smol", "messages": [{"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0, **extra}  # fmt: skip
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def test_concurrent_chats_equal_their_one_at_a_time_greedy_answers(
    server: tuple[str, Any], model: LlamaModel, checkpoint: Checkpoint
) -> None:
    url, _ = server
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: chat(url, q), QUESTIONS))
    for question, answer in zip(QUESTIONS, answers, strict=True):
        assert answer["choices"][0]["message"]["content"] == greedy_text(
            model, checkpoint, question, 24
        )
    assert answers[0]["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert answers[0]["usage"]["total_tokens"] == sum(
        answers[0]["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )


def test_a_streamed_chat_carries_the_same_text_and_ends_with_usage_then_done(
    server: tuple[str, Any],
) -> None:
    url, _ = server
    whole = chat(url, QUESTIONS[1])
    body = {"model": "smol", "messages": [{"role": "user", "content": QUESTIONS[1]}],
            "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_errors_and_metrics(server: tuple[str, Any]) -> None:
    url, _ = server
    reply = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "smol", "prompt": "The capital of France is", "max_tokens": 4,
                             "temperature": 0})  # fmt: skip
    assert reply.status_code == 200 and reply.json()["object"] == "text_completion"
    too_long = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": "smol", "prompt": "hi " * 1100})  # fmt: skip
    assert too_long.status_code == 400 and "maximum context length is 1024" in too_long.text
    unknown = httpx.post(
        f"{url}/v1/completions", timeout=60, json={"model": "gpt-9", "prompt": "x"}
    )
    assert unknown.status_code == 404
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 1024
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("tidal_time_to_first_token_seconds_count", "tidal_generation_tokens_total",
                 "tidal_prefix_cache_hits_total", "tidal_kv_cache_usage_perc"):  # fmt: skip
        assert f'{name}{{model_name="smol"}}' in metrics


def test_sigterm_drains_and_exits_0(server: tuple[str, Any]) -> None:
    url, process = server
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, url, QUESTIONS[1], max_tokens=64, ignore_eos=True)
        time.sleep(0.5)  # the request is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        assert pending.result(timeout=60)["choices"][0]["finish_reason"] == "length"  # finished
    assert process.wait(timeout=60) == 0


# ---------------------------------------------------------------------- batch


def write_input(path: Path, records: int) -> None:
    path.mkdir(parents=True)
    with (path / "requests.jsonl").open("w") as f:
        for i in range(records):
            question = f"Give me fact number {i} about the sea."
            body = {"model": "smol", "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": question}]}  # fmt: skip
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")  # fmt: skip


def run_batch(smollm2: Path, inp: Path, out: Path, attempt: int, stop_after_s: float | None) -> int:
    env = {**os.environ, "TIDAL_INPUT_URI": f"file://{inp}", "TIDAL_OUTPUT_URI": f"file://{out}",
           "TIDAL_SHARD": "0/1", "TIDAL_CHECKPOINT_INTERVAL_SECONDS": "3",
           "TIDAL_ATTEMPT": str(attempt), "TIDAL_RESUME_FROM": ""}  # fmt: skip
    command = [*TIDAL, "batch", "--model", str(smollm2), "--served-model-name", "smol",
               "--concurrency", "8", *ENGINE_FLAGS]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if stop_after_s is not None:
        deadline = time.monotonic() + 120
        while not list((out / "_checkpoints").glob("shard-0/ckpt-*.json")):  # work done
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        time.sleep(stop_after_s)
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, 143), err.decode()[-3000:]
    return process.returncode


def output_lines(out: Path) -> list[dict[str, Any]]:
    """The committed output: the parts the last checkpoint lists, in order."""
    last = sorted((out / "_checkpoints" / "shard-0").glob("ckpt-*.json"))[-1]
    parts = json.loads(last.read_text())["parts"]
    return [json.loads(line) for p in parts for line in (out / p["name"]).read_text().splitlines()]


def test_batch_sigterm_checkpoints_exits_143_and_resume_equals_an_uninterrupted_run(
    smollm2_path: Path, tmp_path: Path
) -> None:
    inp = tmp_path / "in"
    write_input(inp, 40)
    assert run_batch(smollm2_path, inp, tmp_path / "whole", 1, None) == 0
    split = tmp_path / "split"
    assert run_batch(smollm2_path, inp, split, 1, 0.5) == 143
    done = json.loads(sorted((split / "_checkpoints/shard-0").glob("ckpt-*.json"))[-1].read_text())
    assert 0 < done["next_record"] < 40 and not done.get("complete")
    assert run_batch(smollm2_path, inp, split, 2, None) == 0
    whole, resumed = output_lines(tmp_path / "whole"), output_lines(split)
    assert [r["custom_id"] for r in resumed] == [f"req-{i}" for i in range(40)]
    # ids and timestamps differ between runs; the answers may not
    assert [choices(r) for r in resumed] == [choices(r) for r in whole]


def choices(line: dict[str, Any]) -> Any:
    return line["response"]["body"]["choices"]


# ---------------------------------------------------------------------- standalone


def test_the_standalone_launcher_starts_a_real_server_on_its_gpus(
    smollm2_path: Path, tmp_path: Path
) -> None:
    """``tidal node-agent standalone`` with a ``serve:`` entry: a real ``tidal worker serve``,
    launched with the device plugin's environment, answers and stops with the launcher."""
    import yaml  # noqa: PLC0415

    port = free_port()
    spec = tmp_path / "spec.yaml"
    worker = {"name": "chat", "gpus": 1, "env": {"CUDA_VISIBLE_DEVICES": ""},
              "serve": {"model": f"file://{smollm2_path}", "modelName": "smol", "port": port,
                        "dtype": "float32", "attention": "fp16", "args": ENGINE_FLAGS}}  # fmt: skip
    spec.write_text(yaml.safe_dump({"logDir": str(tmp_path / "logs"), "workers": [worker]}))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tidal", "node-agent", "standalone", "--spec", str(spec),
         "--fake", "dgx1-v100"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", launcher)  # type: ignore[arg-type]
        assert chat(f"http://127.0.0.1:{port}", QUESTIONS[0])["model"] == "smol"
    finally:
        launcher.terminate()
        _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, stderr
    log = (tmp_path / "logs" / "chat-0.log").read_text()
    assert "ready: serving smol" in log and "exit 0" in log  # it drained and exited cleanly

"""The serving engine: the block pool and prefix cache, the continuous-batching scheduler and
the stop-string text rule (pure, table-driven), then the engine against the model's own
one-sequence greedy decode (a random tiny Llama: fast; SmolLM2 in test_worker_smollm2.py)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import torch

from tidal.inference_worker.engine.blocks import BlockPool, OutOfBlocksError, block_hashes
from tidal.inference_worker.engine.engine import AsyncEngine, EngineConfig, LLMEngine
from tidal.inference_worker.engine.output import next_text
from tidal.inference_worker.engine.params import (
    EngineDeadError,
    EngineDrainingError,
    RequestOutput,
    SamplingParams,
)
from tidal.inference_worker.engine.runner import ModelRunner
from tidal.inference_worker.engine.scheduler import Scheduler, SchedulerConfig
from tidal.inference_worker.engine.sequence import Sequence, Status
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.settings import (
    SettingsError,
    attention_backend,
    dtype_name,
    parse_bytes,
)
from tidal.inference_worker.weights.source import random_source

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def seq(name: str, prompt: int | list[int], max_tokens: int = 8) -> Sequence:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(name, tokens, GREEDY, max_tokens)


# ---------------------------------------------------------------------- block pool


def test_hash_chain_depends_on_the_whole_prefix_and_ignores_a_partial_block() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = block_hashes([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3  # the 7th token is a partial block: never hashed
    assert a[1] != b[1] and a[2] != b[2]  # same block tokens, different prefix
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, start=1, parent=a[0]) == a[1:]


def test_pool_counts_references_and_keeps_freed_cached_blocks_until_reused() -> None:
    pool = BlockPool(4, 2)
    first = pool.allocate(2)
    pool.publish(first[0], b"h0")
    pool.take([first[0]])  # a second sequence shares it
    assert pool.refs[first[0]] == 2 and pool.num_free == 2
    pool.release(first)
    pool.release([first[0]])
    assert pool.num_free == 4 and pool.lookup([b"h0"]) == [first[0]]  # still hittable
    fresh = pool.allocate(2)  # uncached, least recently freed first
    assert first[0] not in fresh
    pool.allocate(2)  # now the cached block must be reused: its hash goes
    assert pool.lookup([b"h0"]) == []
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)


def test_release_past_zero_is_a_bug_that_raises() -> None:
    pool = BlockPool(2, 2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks)


# ---------------------------------------------------------------------- scheduler


def plan_of(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start, c.count) for c in scheduler.schedule().chunks]


def run_step(scheduler: Scheduler, token: int = 7) -> list[tuple[str, int, int]]:
    plan = scheduler.schedule()
    scheduler.advance(plan, {c.seq: token for c in plan.chunks if c.samples})
    return [(c.seq.request_id, c.start, c.count) for c in plan.chunks]


@pytest.mark.parametrize(
    ("budget", "prompts", "steps"),
    [
        # one prompt within budget, then decode one token a step
        (16, [5], [[("a", 0, 5)], [("a", 5, 1)], [("a", 6, 1)]]),
        # a long prompt is chunked; a later prompt waits for budget, then joins the decodes
        (4, [6, 3], [[("a", 0, 4)], [("a", 4, 2), ("b", 0, 2)], [("a", 6, 1), ("b", 2, 1)],
                     [("a", 7, 1), ("b", 3, 1)]]),
        # running sequences first, then new ones fill the budget
        (8, [3, 3, 3], [[("a", 0, 3), ("b", 0, 3), ("c", 0, 2)], [("a", 3, 1), ("b", 3, 1),
                        ("c", 2, 1)]]),
    ],
)  # fmt: skip
def test_budget_chunked_prefill_and_decode_order(
    budget: int, prompts: list[int], steps: list[list[tuple[str, int, int]]]
) -> None:
    scheduler = Scheduler(SchedulerConfig(8, budget), BlockPool(64, 4))
    for name, length in zip("abc", prompts, strict=False):
        scheduler.add(seq(name, length))
    assert [run_step(scheduler) for _ in steps] == steps


@pytest.mark.parametrize(
    ("prefix_cache", "recomputed"), [(False, ("b", 0, 5)), (True, ("b", 4, 1))]
)
def test_out_of_blocks_preempts_the_newest_by_recompute_and_admits_nothing_new(
    prefix_cache: bool, recomputed: tuple[str, int, int]
) -> None:
    scheduler = Scheduler(SchedulerConfig(8, 64), BlockPool(4, 2, prefix_cache))
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 1)
    for s in (a, b):
        scheduler.add(s)
    assert run_step(scheduler) == [("a", 0, 4), ("b", 0, 4)]  # 2 blocks each: pool full
    scheduler.add(c)
    plan = scheduler.schedule()  # a needs a 3rd block: b (newest) goes
    assert [(x.seq.request_id, x.count) for x in plan.chunks] == [("a", 1)]
    assert plan.preempted == [b] and b.status is Status.WAITING and b.num_computed == 0
    assert list(scheduler.waiting) == [b, c]  # b first: it resumes before new work
    assert b.tokens == [100, 101, 102, 103, 7]  # recompute keeps its output so far
    scheduler.advance(plan, {a: 7})
    scheduler.finish(a, "stop")
    # b recomputes prompt and output, but for the full blocks the prefix cache kept
    assert run_step(scheduler) == [recomputed, ("c", 0, 1)]


def test_a_sequence_that_cannot_grow_preempts_itself_when_alone() -> None:
    scheduler = Scheduler(SchedulerConfig(8, 64), BlockPool(1, 2))
    a = seq("a", 2)
    scheduler.add(a)
    run_step(scheduler)
    plan = scheduler.schedule()
    assert plan.chunks == [] and plan.preempted == [a]


def test_prefix_cache_hits_full_blocks_and_leaves_a_token_to_compute() -> None:
    pool = BlockPool(16, 2)
    scheduler = Scheduler(SchedulerConfig(8, 64), pool)
    first = seq("a", [1, 2, 3, 4, 5])
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first, "stop")
    second = seq("b", [1, 2, 3, 4, 9])  # shares two full blocks
    same = seq("c", [1, 2, 3, 4])  # all cached: the last block is recomputed for its logits
    scheduler.add(second)
    scheduler.add(same)
    assert run_step(scheduler) == [("b", 4, 1), ("c", 2, 2)]
    assert second.cached_prompt_tokens == 4 and same.cached_prompt_tokens == 2
    assert second.blocks[:2] == same.blocks[:1] + second.blocks[1:2]
    assert pool.refs[second.blocks[0]] == 2


def test_waiting_sequences_are_admitted_in_arrival_order() -> None:
    scheduler = Scheduler(SchedulerConfig(8, 64), BlockPool(3, 2))
    big, small = seq("big", 6), seq("small", 1)
    scheduler.add(seq("a", 3))
    run_step(scheduler)
    scheduler.add(big)
    scheduler.add(small)  # would fit, but must not overtake big
    assert run_step(scheduler) == [("a", 3, 1)]


def test_max_num_seqs_caps_the_running_batch() -> None:
    scheduler = Scheduler(SchedulerConfig(2, 64), BlockPool(64, 4))
    for name in "abc":
        scheduler.add(seq(name, 2))
    assert [c[0] for c in run_step(scheduler)] == ["a", "b"]


def test_abort_frees_the_blocks() -> None:
    pool = BlockPool(8, 2)
    scheduler = Scheduler(SchedulerConfig(8, 64), pool)
    a = seq("a", 5)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.finish(a, "abort")
    assert pool.num_free == 8 and not scheduler.has_work and a.finish_reason == "abort"


# ---------------------------------------------------------------------- stop strings


@pytest.mark.parametrize(
    ("text", "sent", "stops", "final", "delta", "stopped"),
    [
        ("Hello wor", "", ["world"], False, "Hello ", False),  # "wor" may begin "world"
        ("Hello world!", "Hello ", ["world"], False, "", True),
        ("Hello wax", "Hello ", ["world"], False, "wax", False),
        ("ab\ufffd", "", [], False, "ab", False),  # half a UTF-8 character waits
        ("abc", "a", [], True, "bc", False),
        ("one\ntwo", "", ["\n"], False, "one", True),
        ("xSTOPySTOP", "", ["STOP", "y"], False, "x", True),  # the earliest stop wins
    ],
)
def test_text_held_back_and_cut_at_stop_strings(
    text: str, sent: str, stops: list[str], final: bool, delta: str, stopped: bool
) -> None:
    step = next_text(text, sent, stops, final)
    assert (step.delta, step.stopped) == (delta, stopped)


# ---------------------------------------------------------------------- engine vs the model


class CharTokenizer:
    """Decodes ids as letters; eos 0."""

    eos_token_ids: tuple[int, ...] = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 60 + 1 for c in text]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if i != 0)

    def apply_chat_template(
        self, messages: Any, add_generation_prompt: bool = True, **_: Any
    ) -> str:
        return "".join(m["content"] for m in messages)


SPEC = ModelSpec("llama", 64, 64, 128, 2, 4, 2, 16, 1e-5, 10000.0, 256, True)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel(SPEC, random_source(SPEC, seed=3), LocalComm())


def engine_for(model: LlamaModel, blocks: int, budget: int, block_size: int = 4) -> LLMEngine:
    length = min(64, blocks * block_size)
    config = EngineConfig(length, blocks, block_size, max_batched_tokens=budget)
    runner = ModelRunner(model, blocks, block_size, length)
    return LLMEngine(runner, CharTokenizer(), config)


def run_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize(
    ("blocks", "budget"),
    [(64, 256), (64, 5), (9, 256)],  # roomy; chunked prefill; preemption by recompute
    ids=["batched", "chunked", "preempting"],
)
def test_engine_greedy_equals_one_sequence_at_a_time(
    model: LlamaModel, blocks: int, budget: int
) -> None:
    rng = random.Random(blocks * 1000 + budget)
    shared = [rng.randrange(1, 64) for _ in range(8)]  # two full blocks every prompt starts with
    prompts = [
        shared + [rng.randrange(1, 64) for _ in range(rng.randrange(1, 12))] for _ in range(5)
    ]
    engine = engine_for(model, blocks, budget)
    preempted = 0
    original = engine.scheduler.schedule

    def counting() -> Any:
        nonlocal preempted
        plan = original()
        preempted += len(plan.preempted)
        return plan

    engine.scheduler.schedule = counting  # type: ignore[method-assign]
    got = run_all(engine, prompts, GREEDY)
    want = [model.greedy(torch.tensor(p), GREEDY.max_tokens or 0) for p in prompts]
    assert got == want
    if blocks == 9:
        assert preempted > 0
    assert engine.pool.num_free == blocks  # everything released
    assert len(engine.pool.cached) > 0


def test_prefix_cache_hit_changes_nothing_in_the_output(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    prompt = list(range(1, 20))
    (first,) = run_all(engine, [prompt], GREEDY)
    again = engine.add("again", prompt, GREEDY)
    out: list[int] = []
    while engine.has_work:
        out += [t for o in engine.step() for t in o.token_ids]
    assert again.cached_prompt_tokens == 16 and out == first


def test_seeded_sampling_reproduces_and_max_tokens_and_stop_tokens_end_requests(
    model: LlamaModel,
) -> None:
    params = SamplingParams(
        max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=11, ignore_eos=True
    )
    prompts = [[5, 6, 7], [9, 9, 9, 9, 9]]
    first = run_all(engine_for(model, 64, 256), prompts, params)
    second = run_all(engine_for(model, 64, 3), prompts[::-1], params)[::-1]
    assert first == second and all(len(x) == 6 for x in first)
    stop_at = first[0][2]
    stopped = run_all(engine_for(model, 64, 256), [prompts[0]],
                      SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=11,
                                     ignore_eos=True, stop_token_ids=(stop_at,)))  # fmt: skip
    assert stopped[0] == first[0][: first[0].index(stop_at)]  # the stop token is not sent


def test_stop_string_ends_the_text_before_it(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    (tokens,) = run_all(engine, [[3, 4, 5]], GREEDY)
    text = CharTokenizer().decode(tokens)
    stop = text[3:5]
    engine.add(
        "s", [3, 4, 5], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=(stop,))
    )
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert "".join(o.text for o in outputs) == text[: text.index(stop)]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].finished


def test_a_prompt_at_max_model_len_is_refused(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        engine.add("long", list(range(64)), GREEDY)


def test_a_cache_smaller_than_max_model_len_is_refused_with_the_knobs_to_turn() -> None:
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        EngineConfig(max_model_len=100, num_blocks=3, block_size=16)


# ---------------------------------------------------------------------- the asyncio bridge


def test_a_caller_that_leaves_aborts_its_request_and_frees_its_blocks(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    client = AsyncEngine("m", 64, CharTokenizer())
    client.attach(engine)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def leave_after_one() -> RequestOutput:
        stream = client.generate("gone", [1, 2, 3, 4, 5], long)
        first = await anext(stream)
        await stream.aclose()  # what a client disconnect does to the server's iterator
        return first

    try:
        first = asyncio.run(leave_after_one())
        assert not first.finished
        deadline = time.monotonic() + 10
        while engine.requests or engine.pool.num_free != 64:
            assert time.monotonic() < deadline, "the aborted request kept its blocks"
            time.sleep(0.01)

        async def whole() -> list[RequestOutput]:
            return [o async for o in client.generate("next", [1, 2, 3], GREEDY)]

        outputs = asyncio.run(whole())  # the engine goes on serving others
        assert outputs[-1].finished and outputs[-1].completion_tokens == 8
    finally:
        client.shutdown()


def test_a_dead_engine_loop_fails_every_stream_and_refuses_new_ones(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    client = AsyncEngine("m", 64, CharTokenizer())
    deaths: list[BaseException] = []
    client.on_death = deaths.append

    def broken_step() -> list[RequestOutput]:
        raise RuntimeError("rank 1 is gone")

    engine.step = broken_step  # type: ignore[method-assign]
    client.attach(engine)

    async def ask() -> None:
        async for _ in client.generate("a", [1, 2, 3], GREEDY):
            pass

    with pytest.raises(EngineDeadError, match="rank 1 is gone"):
        asyncio.run(ask())
    assert not client.is_ready() and len(deaths) == 1
    with pytest.raises(EngineDeadError):
        asyncio.run(ask())


# ---------------------------------------------------------------------- worker options


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GiB", 4 << 30),
        ("512Mi", 512 << 20),
        ("2G", 2 * 10**9),
        ("1000", 1000),
        ("1.5GB", 1_500_000_000),
    ],
)
def test_kv_cache_sizes_read_as_kubernetes_quantities(text: str, size: int) -> None:
    assert parse_bytes(text, "--kv-cache-memory") == size


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: parse_bytes("lots", "--kv-cache-memory"),
            "--kv-cache-memory: 'lots' is not a size",
        ),
        (lambda: dtype_name("int8"), "TIDAL_DTYPE: int8 weights are not supported"),
        (lambda: dtype_name("fp8"), "TIDAL_DTYPE: 'fp8' is not one of"),
        (lambda: attention_backend("flash"), "TIDAL_ATTENTION: 'flash' is not one of"),
    ],
)
def test_bad_worker_options_name_the_option(call: Any, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        call()


def test_the_crds_attention_values_map_to_worker_backends() -> None:
    assert [attention_backend(v) for v in ("fp16", "int8", "sdpa")] == ["sdpa", "int8", "sdpa"]


def test_shutdown_ends_the_streams_still_running(model: LlamaModel) -> None:
    engine = engine_for(model, 64, 256)
    client = AsyncEngine("m", 64, CharTokenizer())
    client.attach(engine)
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def cut_short() -> None:
        stream = client.generate("long", [1, 2, 3], long)
        await anext(stream)
        await asyncio.to_thread(client.shutdown)
        async for _ in stream:
            pass

    with pytest.raises(EngineDrainingError, match="shut down"):
        asyncio.run(cut_short())

"""The engine under tensor parallelism over gloo: ranks above 0 follow rank 0's plan every
step, serial and ISO prefill steps give the tokens TP=1 gives, and a dead rank fails rank 0's
step instead of hanging it. (Spawning ranks costs seconds: few configurations.)"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.test_worker_engine import CharTokenizer
from tidal.inference_worker.engine.engine import EngineConfig, LLMEngine, follow
from tidal.inference_worker.engine.params import SamplingParams
from tidal.inference_worker.engine.runner import ModelRunner
from tidal.inference_worker.iso_split import OpCosts
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.parallel.launch import RankError, launch
from tidal.inference_worker.weights.source import random_source

SPEC = ModelSpec("llama", 96, 128, 256, 2, 8, 4, 16, 1e-5, 10000.0, 512, False)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# Costs under which a split pays (compute hides the all-reduces): lone prefills run ISO.
ISO_ALWAYS = OpCosts(a_token=1e-3, a_pair=0.0, f_token=1e-3, r_fixed=1e-4, r_token=1e-4)
PROMPTS = [list(range(1, 40)), list(range(10, 17)), [5] * 70]


def _engine(comm: Any, iso: bool) -> tuple[LLMEngine | None, ModelRunner]:
    model = LlamaModel(SPEC, random_source(SPEC, seed=5, dtype=torch.float64), comm, torch.float64)
    runner = ModelRunner(model, 64, 8, 256)
    if comm.rank != 0:
        return None, runner
    config = EngineConfig(256, 64, 8, max_batched_tokens=64, iso_min_tokens=16)
    return LLMEngine(runner, CharTokenizer(), config, costs=ISO_ALWAYS if iso else None), runner


def _serve(comm: Any, device: Any, iso: bool, die_after: int | None) -> Any:
    engine, runner = _engine(comm, iso)
    if engine is None:
        if die_after is not None:
            for _ in range(die_after):
                runner.execute(comm.broadcast_object(None))
            os._exit(3)  # dies mid-request, as a crashed or OOM-killed rank would
        follow(runner)
        return None
    outputs: dict[str, list[int]] = {}
    isos = 0
    # One prompt at a time first (lone prefills: the ISO candidates), then all together.
    for i, prompt in enumerate(PROMPTS):
        engine.add(f"alone-{i}", prompt, GREEDY)
        isos += _drain(engine, outputs)
    for i, prompt in enumerate(PROMPTS):
        engine.add(f"together-{i}", prompt, GREEDY)
    _drain(engine, outputs)
    engine.shutdown_followers()
    return outputs, isos


def _drain(engine: LLMEngine, outputs: dict[str, list[int]]) -> int:
    isos = 0
    original = engine._work

    def counting(plan: Any) -> Any:
        nonlocal isos
        work = original(plan)
        isos += work.iso_split is not None
        return work

    engine._work = counting  # type: ignore[method-assign]
    while engine.has_work:
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.token_ids)
    engine._work = original  # type: ignore[method-assign]
    return isos


def _tp1() -> dict[str, list[int]]:
    engine, _ = _engine(LocalComm(), iso=False)
    assert engine is not None
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add(f"alone-{i}", prompt, GREEDY)
        _drain(engine, outputs)
    for i, prompt in enumerate(PROMPTS):
        engine.add(f"together-{i}", prompt, GREEDY)
    _drain(engine, outputs)
    return outputs


@pytest.mark.parametrize("iso", [False, True], ids=["serial", "iso"])
def test_tp2_engine_equals_tp1(iso: bool) -> None:
    (outputs, isos), _ = launch(_serve, 2, iso, None, timeout=300)
    assert outputs == _tp1()
    # ISO for each lone prefill chunk of >= 16 tokens: the 39-token prompt and the first
    # 64-token chunk of the 70-token one (its 6-token rest, and the 7-token prompt, are serial)
    assert isos == (2 if iso else 0)


def test_a_rank_that_dies_fails_the_step_not_hangs_it() -> None:
    with pytest.raises(RankError) as failure:
        launch(_serve, 2, False, 1, timeout=120)
    assert "rank" in str(failure.value)

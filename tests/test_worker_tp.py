"""ISO prefill on the real decoder over gloo: two CPU ranks, float64, a random Llama-shaped
checkpoint. ISO equals serial prefill (hidden states and the KV cache it leaves) at odd lengths
and at split points 1 and S-1, both equal the unsharded model, and the all-reduces are issued
and waited for in the overlapped order. One spawn for all of it: starting two ranks and
importing torch in each costs about 13 s on a 2-core machine."""

from __future__ import annotations

from typing import Any

import torch

from tidal.inference_worker.iso import prefill_iso
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.parallel.comm import LocalComm, RecordingComm
from tidal.inference_worker.parallel.launch import launch
from tidal.inference_worker.weights.source import DictSource, random_source

SPEC = ModelSpec(
    architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96, layers=2,
    heads=4, kv_heads=2, head_dim=16, rms_eps=1e-5, rope_theta=10000.0, max_position=512,
    tie_embeddings=False,
)  # fmt: skip
TOKENS = 37
SPLITS = (1, 16, TOKENS - 1)


def random_checkpoint(spec: ModelSpec) -> DictSource:
    return random_source(spec, seed=0, dtype=torch.float64)


def prompt() -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(3))


def _snapshot(cache: Any) -> list[torch.Tensor]:
    return [t.clone() for layer in range(len(cache)) for t in cache[layer].read(TOKENS)]


def _rank(comm: Any, device: torch.device) -> dict[str, Any]:
    recording = RecordingComm(comm)
    model = LlamaModel(SPEC, random_checkpoint(SPEC), recording, dtype=torch.float64)
    ids = prompt()
    serial_cache = model.new_cache(TOKENS)
    serial = model.forward(ids, serial_cache, 0)
    reference = _snapshot(serial_cache)
    worst_hidden, worst_cache = 0.0, 0.0
    logs = {}
    for split in SPLITS:
        cache = model.new_cache(TOKENS)
        recording.reset()
        iso = prefill_iso(model, ids, cache, split)
        logs[split] = list(recording.log)
        worst_hidden = max(worst_hidden, float((iso - serial).abs().max()))
        for a, b in zip(_snapshot(cache), reference, strict=True):
            worst_cache = max(worst_cache, float((a - b).abs().max()))
    return {"serial": serial, "hidden": worst_hidden, "cache": worst_cache, "logs": logs}


def _expected_log(layers: int) -> list[tuple[str, int]]:
    """The embedding's blocking all-reduce, then per layer o0, o1, m0, m1 overlapped."""
    log: list[tuple[str, int]] = [("sync", 0)]
    for layer in range(layers):
        o0, o1, m0, m1 = (1 + 4 * layer + k for k in range(4))
        log.append(("issue", o0))
        if layer:
            log.append(("wait", o0 - 1))  # the previous layer's m1, before chunk 1's attention
        log += [("wait", o0), ("issue", o1), ("wait", o1), ("issue", m0), ("wait", m0),
                ("issue", m1)]  # fmt: skip
    return [*log, ("wait", 4 * layers)]


def test_iso_over_gloo_equals_serial_and_the_unsharded_model() -> None:
    ranks = launch(_rank, 2, timeout=300)
    for result in ranks:
        assert result["hidden"] <= 1e-12, result["hidden"]
        assert result["cache"] <= 1e-12, result["cache"]
        for split in SPLITS:
            assert result["logs"][split] == _expected_log(SPEC.layers), split
    whole = LlamaModel(SPEC, random_checkpoint(SPEC), LocalComm(), dtype=torch.float64)
    unsharded = whole.forward(prompt(), whole.new_cache(TOKENS), 0)
    assert torch.allclose(ranks[0]["serial"], unsharded, atol=1e-12, rtol=0)

"""The Llama-family decoder against Hugging Face transformers (the oracle: the package itself
never imports it), its KV cache, tensor parallelism (in-process shards and gloo ranks), the
launcher's failure handling and the INT8 attention backend under Triton's interpreter.

Tolerances: logits vs transformers 1e-4 absolute (fp32); cache vs full forward 1e-5; TP=2 vs
TP=1 1e-5 in fp32 and 1e-12 in fp64; INT8 vs SDPA last-position logits cosine >= 0.999.

transformers is imported inside the helpers: the gloo ranks import this module and should not
pay for it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytest
import torch
from torch.nn import functional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors

from tidal.inference_worker import attention as attention_module
from tidal.inference_worker.attention import attend, merge
from tidal.inference_worker.model.llama import LlamaModel, rope_inv_freq
from tidal.inference_worker.model.spec import ModelSpec, RopeScaling, SpecError
from tidal.inference_worker.parallel.comm import Comm, LocalComm, NoopComm
from tidal.inference_worker.parallel.launch import RankError, launch
from tidal.inference_worker.weights.source import DictSource

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short: the scaled band covers head_dim 64's
}
CASES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "llama3_scaling": {"arch": "llama", "rope": LLAMA3, "rope_theta": 500000.0},
    "qwen2_tied": {"arch": "qwen2", "tie": True, "vocab": 1001},  # 1001: uneven vocab shards
}


def make_checkpoint(case: str, seed: int = 0) -> tuple[Any, ModelSpec, dict[str, torch.Tensor]]:
    """A random transformers model (fixed seed), its ModelSpec and state dict."""
    from transformers import (  # noqa: PLC0415
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    options = CASES[case]
    qwen = options["arch"] == "qwen2"
    kwargs: dict[str, Any] = {
        "hidden_size": 128,
        "head_dim": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": options.get("vocab", 1000),
        "tie_word_embeddings": options.get("tie", False),
        "initializer_range": 0.1,  # larger than 0.02: logits that are not near-ties
    }
    theta = options.get("rope_theta", 10000.0)
    scaling = options.get("rope")
    kwargs["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    torch.manual_seed(seed)
    model: Any = (
        Qwen2ForCausalLM(Qwen2Config(**kwargs)) if qwen else LlamaForCausalLM(LlamaConfig(**kwargs))
    )
    model.eval()
    config = model.config
    spec = ModelSpec(
        architecture=options["arch"],
        vocab_size=kwargs["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        layers=2,
        heads=8,
        kv_heads=4,
        head_dim=64,
        rms_eps=config.rms_norm_eps,
        rope_theta=theta,
        max_position=config.max_position_embeddings,
        tie_embeddings=kwargs["tie_word_embeddings"],
        qkv_bias=qwen,
        rope_scaling=None
        if scaling is None
        else RopeScaling(
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"],
        ),
    )
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return model, spec, state


def build(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    comm: Comm | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
) -> LlamaModel:
    return LlamaModel(spec, DictSource(state), comm or LocalComm(), dtype=dtype,
                      attention=attention)  # fmt: skip


def all_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    logits = model.logits(model.forward(ids, model.new_cache(ids.shape[0]), 0))
    assert logits is not None
    return logits  # [T, vocab]


# -- against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_greedy_match_transformers(case: str) -> None:
    hf, spec, state = make_checkpoint(case)
    model = build(spec, state)
    ids = torch.randint(0, spec.vocab_size, (48,))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]  # [T, vocab]
        generated = hf.generate(
            ids[None], max_new_tokens=8, do_sample=False, attention_mask=torch.ones(1, 48)
        )[0, 48:].tolist()
    ours = all_logits(model, ids)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-4
    last = model.prefill(ids, model.new_cache(48))
    assert last is not None
    assert torch.allclose(last, expected[-1], atol=1e-4, rtol=0)
    assert model.greedy(ids, 8) == generated


def test_llama3_frequencies_equal_transformers() -> None:
    from transformers import LlamaConfig  # noqa: PLC0415
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415

    config = LlamaConfig(
        hidden_size=1024, num_attention_heads=8,
        rope_parameters={**LLAMA3, "original_max_position_embeddings": 8192, "rope_theta": 5e5},
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = rope_inv_freq(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, rope_inv_freq(128, 500000.0))  # the scaling did something


# -- KV cache ------------------------------------------------------------------------------


def test_cache_prefill_then_decode_equals_full_forward() -> None:
    _, spec, state = make_checkpoint("qwen2_tied", seed=1)
    model = build(spec, state)
    ids = torch.randint(0, spec.vocab_size, (21,))
    full = all_logits(model, ids)  # [21, vocab]

    cache = model.new_cache(21)
    prefill = model.prefill(ids[:20], cache)
    decoded = model.decode_step(int(ids[20]), cache, 20)
    assert prefill is not None and decoded is not None
    assert (prefill - full[19]).abs().max().item() <= 1e-5
    assert (decoded - full[20]).abs().max().item() <= 1e-5

    chunked = model.new_cache(21)  # prefill in two chunks: the query-offset mask
    model.forward(ids[:13], chunked, 0)
    tail = model.logits(model.forward(ids[13:], chunked, 13))
    assert tail is not None
    assert (tail - full[13:]).abs().max().item() <= 1e-5


def test_cache_rejects_writes_past_capacity() -> None:
    _, spec, state = make_checkpoint("llama")
    model = build(spec, state)
    with pytest.raises(ValueError, match=r"\[3, 5\) do not fit a KV cache of 4 tokens"):
        model.forward(torch.tensor([1, 2]), model.new_cache(4), 3)


# -- tensor parallelism ----------------------------------------------------------------------


def test_shards_sum_to_the_unsharded_layer_fp64() -> None:
    """Each rank's partials (built in this process with NoopComm) sum to TP=1's: the slicing
    of heads, MLP features and vocabulary, without processes."""
    _, spec, state = make_checkpoint("qwen2_tied")
    full = build(spec, state, dtype=torch.float64)
    ranks = [build(spec, state, NoopComm(r, 2), dtype=torch.float64) for r in range(2)]
    ids = torch.randint(0, spec.vocab_size, (9,))
    ids[0] = spec.vocab_size - 1  # the last id, in the padded shard
    x = full.embedding(ids)
    assert (sum(m.embedding(ids) for m in ranks) - x).abs().max() <= 1e-12
    positions = torch.arange(9)
    attn = full.layers[0].attention_partial(x, positions, full.new_cache(9)[0], 0)
    parts = [m.layers[0].attention_partial(x, positions, m.new_cache(9)[0], 0) for m in ranks]
    assert (parts[0] + parts[1] - attn).abs().max() <= 1e-12
    mlp = [m.layers[1].mlp_partial(x) for m in ranks]
    assert (mlp[0] + mlp[1] - full.layers[1].mlp_partial(x)).abs().max() <= 1e-12
    local = [functional.linear(full.norm(x), m.lm_head.weight) for m in ranks]  # [T, 501] each
    head = torch.cat(local, dim=-1)[:, : spec.vocab_size]
    assert (head - functional.linear(full.norm(x), full.lm_head.weight)).abs().max() <= 1e-12


def test_tp_that_does_not_divide_heads_raises() -> None:
    _, spec, state = make_checkpoint("llama")
    with pytest.raises(SpecError, match=r"tensor parallelism 3 .* 8 attention heads and 4 KV"):
        build(spec, state, NoopComm(0, 3))


def _tp_rank(comm: Comm, device: torch.device, runs: list[Any]) -> list[Any]:
    """A gloo rank: every run's logits at all positions and its greedy tokens."""
    out = []
    for spec, state, dtype, ids in runs:
        model = LlamaModel(spec, DictSource(state), comm, dtype=dtype, device=device)
        out.append((all_logits_or_none(model, ids), model.greedy(ids, 4)))
    return out


def all_logits_or_none(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor | None:
    return model.logits(model.forward(ids, model.new_cache(ids.shape[0]), 0))


def test_tp2_over_gloo_equals_tp1() -> None:
    runs = []
    for case in ("llama3_scaling", "qwen2_tied"):
        _, spec, state = make_checkpoint(case, seed=2)
        ids = torch.randint(0, spec.vocab_size, (24,))
        for dtype in (torch.float32, torch.float64):
            runs.append((spec, state, dtype, ids))
    ranks = launch(_tp_rank, 2, runs, timeout=120)
    for (spec, state, dtype, ids), (logits, tokens), (none, tokens1) in zip(
        runs, ranks[0], ranks[1], strict=True
    ):
        single = build(spec, state, dtype=dtype)
        expected = all_logits(single, ids)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert logits is not None and none is None  # gathered on rank 0 only
        assert logits.dtype == dtype
        assert (logits - expected).abs().max().item() <= tolerance, (spec.architecture, dtype)
        assert tokens == tokens1 == single.greedy(ids, 4)


def _failing_rank(comm: Comm, device: torch.device) -> None:
    if comm.rank == 1:
        raise ValueError("rank one is broken")
    comm.all_reduce(torch.ones(1))  # blocks: rank 1 never joins
    comm.all_reduce(torch.ones(1))


def test_launch_reports_a_failing_rank_and_does_not_hang() -> None:
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one is broken"):
        launch(_failing_rank, 2, timeout=60)


# -- attention backends ----------------------------------------------------------------------


def test_lse_merge_of_two_key_sets_equals_attention_over_both() -> None:
    q, k, v = torch.randn(4, 5, 64), torch.randn(4, 12, 64), torch.randn(4, 12, 64)

    def part(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = q @ keys.transpose(-1, -2) / math.sqrt(64)  # [H, T, S]
        return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)

    merged = merge(*part(k[:, :7], v[:, :7]), *part(k[:, 7:], v[:, 7:]))
    assert torch.allclose(merged, functional.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_sdpa_offset_mask_is_bottom_right() -> None:
    q, k, v = torch.randn(8, 3, 64), torch.randn(4, 10, 64), torch.randn(4, 10, 64)
    out = attend(q, k, v, offset=7)
    for i in range(3):  # query i sees keys 0 .. 7 + i
        keys = k[:, : 8 + i].repeat_interleave(2, 0)
        values = v[:, : 8 + i].repeat_interleave(2, 0)
        row = functional.scaled_dot_product_attention(q[:, i : i + 1], keys, values)
        assert torch.allclose(out[:, i : i + 1], row, atol=1e-6)


def test_int8_without_interpreter_falls_back_to_sdpa(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(attention_module, "_warned", set())
    q, k, v = torch.randn(8, 6, 64), torch.randn(4, 6, 64), torch.randn(4, 6, 64)
    with caplog.at_level(logging.WARNING):
        out = attend(q, k, v, 0, "int8")
        attend(q, k, v, 0, "int8")
    assert torch.equal(out, attend(q, k, v, 0, "sdpa"))
    assert [r.message for r in caplog.records].count(
        "attention='int8' falls back to SDPA: CPU tensors need Triton's interpreter "
        "(TRITON_INTERPRET=1)"
    ) == 1


@pytest.mark.parametrize("seq", [65, 130])
def test_int8_attention_close_to_sdpa(seq: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole prefill, and a chunked one (the query offset) both through the kernel's
    ``q_offset`` and through the LSE merge of two calls."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, spec, state = make_checkpoint("llama3_scaling", seed=3)
    ids = torch.randint(0, spec.vocab_size, (seq,))
    sdpa = build(spec, state)
    reference = sdpa.prefill(ids, sdpa.new_cache(seq))
    int8 = build(spec, state, attention="int8")
    results = [int8.prefill(ids, int8.new_cache(seq))]
    split = seq - seq // 3  # a chunk no longer than its offset (the merge's past part)
    for kernel_offset in (True, False):
        monkeypatch.setattr(attention_module, "use_kernel_offset", kernel_offset)
        cache = int8.new_cache(seq)
        int8.forward(ids[:split], cache, 0)
        chunked = int8.logits(int8.forward(ids[split:], cache, split)[-1:])
        results.append(None if chunked is None else chunked[0])
    assert reference is not None
    for got in results:
        assert got is not None
        assert functional.cosine_similarity(got, reference, dim=0).item() >= 0.999


# -- a checkpoint directory as transformers writes it, through the worker's own loader ---------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_saved_checkpoint_loads_and_matches_transformers(tmp_path: Any, family: str) -> None:
    """save_pretrained (sharded safetensors, 2 layers, random fp32) -> the HF loader (spec from
    config.json, each tensor read by slices) -> the decoder: logits within 1e-4."""
    import transformers  # noqa: PLC0415

    from tidal.inference_worker.weights.hf import SafetensorsSource, spec_from_config  # noqa: PLC0415

    torch.manual_seed(1)
    shape: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, vocab_size=300,
                 max_position_embeddings=256, initializer_range=0.1)  # fmt: skip
    reference: Any
    if family == "llama":
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded, with an index
    ours = LlamaModel(spec_from_config(tmp_path / "config.json"), SafetensorsSource(tmp_path),
                      LocalComm())  # fmt: skip
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
        got = ours.logits(ours.forward(ids, ours.new_cache(23), 0))
    assert got is not None
    assert float((got - expected).abs().max()) <= 1e-4

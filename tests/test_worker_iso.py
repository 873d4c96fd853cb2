"""ISO prefill: the split chooser's arithmetic (pure), and the two-chunk schedule on a small
stand-in decoder whose attention reads every earlier token through its cache, so chunk 1 is
wrong unless chunk 0's keys of the same layer are in place first. The real model's ISO over
gloo is tested with the model (tests/test_worker_tp.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tidal.inference_worker.iso import prefill_iso
from tidal.inference_worker.iso_split import (
    OpCosts,
    choose_split,
    exposed_share_hidden,
    iso_time,
    serial_time,
)
from tidal.inference_worker.parallel.comm import LocalComm, RecordingComm

# -- the split chooser ------------------------------------------------------------------------


def test_gemm_dominated_layers_split_near_the_middle() -> None:
    costs = OpCosts(a_token=1e-5, a_pair=0.0, f_token=2e-5, r_fixed=1e-4, r_token=2e-5)
    choice = choose_split(costs, 1024, layers=8)
    assert choice.split == 512
    assert choice.iso_s < choice.serial_s


def test_attention_dominated_layers_give_chunk_0_more_tokens() -> None:
    # Attention ten times the MLP, an all-reduce about as long as a chunk's attention: chunk 1's
    # rows see more keys, so equalising the overlapped pairs puts the split past the middle.
    costs = OpCosts(a_token=1e-7, a_pair=2e-8, f_token=1e-6, r_fixed=1e-5, r_token=1e-5)
    choice = choose_split(costs, 2048, layers=4, block=64)
    assert choice.split is not None and 1024 < choice.split < 2048 - 64
    assert choice.split % 64 == 0
    assert choice.iso_s < 0.8 * choice.serial_s


def test_when_the_model_is_flat_the_chunks_get_equal_compute() -> None:
    # Costs measured on gloo: the all-reduce looks cheap in isolation, so every split models
    # within a fraction of a percent; balanced chunks are the robust choice, not the edge.
    costs = OpCosts(a_token=1.8e-5, a_pair=0.0, f_token=3.3e-5, r_fixed=4.5e-4, r_token=1e-6)
    assert choose_split(costs, 2048, layers=8).split == 1024
    causal = OpCosts(a_token=1e-6, a_pair=1e-8, f_token=3e-6, r_fixed=4.5e-4, r_token=1e-7)
    split = choose_split(causal, 2048, layers=8).split
    assert split is not None and 1024 < split < 1448  # chunk 1's rows see more keys


def test_short_prompts_and_cheap_communication_stay_serial() -> None:
    costs = OpCosts(a_token=1e-5, a_pair=0.0, f_token=1e-5, r_fixed=1e-4, r_token=1e-6)
    assert choose_split(costs, 128, layers=8, min_tokens=256).split is None
    free = OpCosts(a_token=1e-5, a_pair=0.0, f_token=1e-5, r_fixed=0.0, r_token=0.0)
    assert choose_split(free, 1024, layers=8).split is None  # nothing to hide, only overhead


def test_the_cost_model_is_bounded_by_compute_and_communication() -> None:
    costs = OpCosts(a_token=3e-6, a_pair=1e-9, f_token=5e-6, r_fixed=2e-4, r_token=4e-6)
    tokens, layers = 1024, 6
    compute = layers * (costs.attention(tokens, 0) + costs.mlp(tokens))
    communication = layers * 2 * costs.all_reduce(tokens)
    for split in (64, 512, 960):
        iso = iso_time(costs, tokens, split, layers)
        assert iso >= max(compute, communication) * 0.9  # chunking shifts attention a little
        assert iso <= serial_time(costs, tokens, layers) * 1.25


def test_exposed_share_hidden() -> None:
    assert exposed_share_hidden(serial_s=10.0, iso_s=8.0, compute_s=6.0) == 0.5
    assert exposed_share_hidden(serial_s=6.0, iso_s=6.5, compute_s=6.0) == 0.0


# -- the schedule on a stand-in decoder -----------------------------------------------------


class StandInCache:
    def __init__(self, layers: int, tokens: int, dim: int) -> None:
        self.store = [torch.full((tokens, dim), float("nan"), dtype=torch.float64)
                      for _ in range(layers)]  # fmt: skip

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.store[layer]


class StandInLayer:
    """attention: each row mixes its input with the mean of every cached row up to its
    position (a causal dependency on earlier tokens of the same layer); mlp: token-local."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        self.w_att = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
        self.w_mlp = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5

    def attention_partial(
        self, x: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int
    ) -> torch.Tensor:
        kv[start : start + x.shape[0]] = x
        seen = kv[: start + x.shape[0]]
        prefix_mean = seen.cumsum(0) / torch.arange(1, seen.shape[0] + 1)[:, None]
        return torch.tanh((x + prefix_mean[start:]) @ self.w_att)

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w_mlp)


class StandInModel:
    def __init__(self, comm: Any, layers: int = 3, dim: int = 16, vocab: int = 50) -> None:
        generator = torch.Generator().manual_seed(7)
        self.comm = comm
        self.embedding = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)
        self.layers = [StandInLayer(dim, generator) for _ in range(layers)]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]

    def forward(self, ids: torch.Tensor, cache: StandInCache, start: int) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(start, start + ids.shape[0])
        for index, layer in enumerate(self.layers):
            x = x + self.comm.all_reduce(layer.attention_partial(x, positions, cache[index], start))
            x = x + self.comm.all_reduce(layer.mlp_partial(x))
        return x


@pytest.mark.parametrize(("tokens", "split"), [(17, 1), (17, 16), (33, 12), (64, 32)])
def test_iso_equals_serial_prefill_and_leaves_the_same_cache(tokens: int, split: int) -> None:
    model = StandInModel(LocalComm())
    ids = torch.randint(0, 50, (tokens,), generator=torch.Generator().manual_seed(tokens))
    serial_cache, iso_cache = StandInCache(3, tokens, 16), StandInCache(3, tokens, 16)
    serial = model.forward(ids, serial_cache, 0)
    iso = prefill_iso(model, ids, iso_cache, split)
    assert torch.allclose(iso, serial, atol=1e-12, rtol=0)
    for a, b in zip(iso_cache.store, serial_cache.store, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_the_schedule_issues_and_waits_in_the_overlapped_order() -> None:
    comm = RecordingComm(LocalComm())
    model = StandInModel(comm, layers=2)
    prefill_iso(model, torch.arange(10), StandInCache(2, 10, 16), 4)
    # per layer: o0, o1, m0, m1 (numbered in issue order); chunk 1 waits for the previous
    # layer's m1 only after A0 of this layer and its all-reduce were issued
    expected = [
        ("issue", 0), ("wait", 0), ("issue", 1), ("wait", 1), ("issue", 2), ("wait", 2),
        ("issue", 3),
        ("issue", 4), ("wait", 3), ("wait", 4), ("issue", 5), ("wait", 5), ("issue", 6),
        ("wait", 6), ("issue", 7), ("wait", 7),
    ]  # fmt: skip
    assert comm.log == expected


def test_a_split_outside_the_prompt_is_refused() -> None:
    model = StandInModel(LocalComm())
    with pytest.raises(ValueError, match="ISO split 10 must lie strictly inside"):
        prefill_iso(model, torch.arange(10), StandInCache(3, 10, 16), 10)

"""Sampling: greedy, temperature, top-k, top-p and seeds, on fixed logits."""

from __future__ import annotations

import pytest
import torch

from tidal.inference_worker.engine.params import SamplingParams
from tidal.inference_worker.generate import sample

GREEDY = SamplingParams(temperature=0)

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def draws(sampling: SamplingParams, count: int = 400) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {sample(LOGITS, sampling, generator) for _ in range(count)}


def test_temperature_zero_is_greedy() -> None:
    assert sample(LOGITS, GREEDY, None) == 4


def test_top_k_keeps_the_k_best() -> None:
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 4}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, dim=-1)  # 4: 0.61, 0: 0.22, 1: 0.08, ...
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 4}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {4}


def test_a_seed_reproduces_a_draw_and_high_temperature_spreads_it() -> None:
    def run(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample(LOGITS, SamplingParams(temperature=5.0), generator) for _ in range(50)]

    assert run(1) == run(1)
    assert len(set(run(1))) == 5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("max_tokens", 0, "max_tokens"), ("temperature", -1.0, "temperature"),
     ("top_p", 0.0, "top_p"), ("top_k", -1, "top_k")],
)  # fmt: skip
def test_bad_parameters_name_the_field(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})  # type: ignore[arg-type]

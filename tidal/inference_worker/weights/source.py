"""Where the model's tensors come from, in Hugging Face names (``model.layers.0.self_attn.q_proj.
weight``), whatever the file format. A rank reads only its slice: rows of a column-parallel
weight, columns of a row-parallel one."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from tidal.inference_worker.model.spec import ModelSpec


class TensorSource(Protocol):
    def names(self) -> set[str]:
        """Every tensor the checkpoint holds."""

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (float32 unless the file says otherwise), only ``rows`` of dimension
        0 and ``cols`` of dimension 1 when given; KeyError naming it when absent."""


def slice_tensor(tensor: torch.Tensor, rows: slice | None, cols: slice | None) -> torch.Tensor:
    """``rows`` of dimension 0 and ``cols`` of dimension 1 of an in-memory tensor (views)."""
    if rows is not None:
        tensor = tensor[rows]
    if cols is not None:
        tensor = tensor[:, cols]
    return tensor


class DictSource:
    """Tensors already in memory (tests, and the converted cache), sliced on request."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        return slice_tensor(self.tensors[name], rows, cols)


def random_source(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> DictSource:
    """Every tensor of a Llama-family checkpoint of ``spec``'s shape, random (weights scaled by
    1/sqrt(fan-in), norms near 1): for tests and benchmarks that need no real weights."""
    g = torch.Generator().manual_seed(seed)
    d, inner = spec.hidden_size, spec.intermediate_size
    q_rows, kv_rows = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim

    def weight(*shape: int) -> torch.Tensor:
        values: torch.Tensor = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (values / math.sqrt(shape[-1])).to(dtype)

    def norm() -> torch.Tensor:
        values: torch.Tensor = 1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        return values.to(dtype)

    tensors = {"model.embed_tokens.weight": weight(spec.vocab_size, d), "model.norm.weight": norm()}
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = weight(spec.vocab_size, d)
    for i in range(spec.layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        tensors |= {
            f"model.layers.{i}.input_layernorm.weight": norm(),
            f"model.layers.{i}.post_attention_layernorm.weight": norm(),
            attn + "q_proj.weight": weight(q_rows, d),
            attn + "k_proj.weight": weight(kv_rows, d),
            attn + "v_proj.weight": weight(kv_rows, d),
            attn + "o_proj.weight": weight(d, q_rows),
            mlp + "gate_proj.weight": weight(inner, d),
            mlp + "up_proj.weight": weight(inner, d),
            mlp + "down_proj.weight": weight(d, inner),
        }
        if spec.qkv_bias:
            tensors |= {attn + f"{n}_proj.bias": weight(r) for n, r in
                        (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}  # fmt: skip
    return DictSource(tensors)

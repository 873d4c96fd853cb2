"""Where the model's tensors come from, in Hugging Face names (``model.layers.0.self_attn.q_proj.
weight``), whatever the file format. A rank reads only its slice: rows of a column-parallel
weight, columns of a row-parallel one."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    def names(self) -> set[str]:
        """Every tensor the checkpoint holds."""

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (float32 unless the file says otherwise), only ``rows`` of dimension
        0 and ``cols`` of dimension 1 when given; KeyError naming it when absent."""


class DictSource:
    """Tensors already in memory (tests, and the converted cache), sliced on request."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        tensor = self.tensors[name]
        if rows is not None:
            tensor = tensor[rows]
        if cols is not None:
            tensor = tensor[:, cols]
        return tensor

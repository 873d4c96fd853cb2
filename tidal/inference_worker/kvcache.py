"""The KV cache: for now one contiguous buffer per layer for one sequence.

Kept behind :class:`KVCache` / :class:`LayerKV` so that the paged, batched cache of the next
step replaces this file, not the model: the model only calls :meth:`LayerKV.write` and
:meth:`LayerKV.read`.
"""

from __future__ import annotations

import torch


class CacheFullError(ValueError):
    """A write past the cache's capacity; the message names the positions and the capacity."""


class LayerKV:
    """One layer's keys and values for this rank's KV heads, ``[kv_heads_local, max_tokens,
    head_dim]`` each, positions along dimension 1."""

    def __init__(
        self,
        kv_heads: int,
        max_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_tokens(self) -> int:
        return self.k.shape[1]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ``[kv_heads_local, T, head_dim]`` at positions ``[start, start + T)``."""
        end = start + k.shape[1]
        if start < 0 or end > self.max_tokens:
            raise CacheFullError(
                f"positions [{start}, {end}) do not fit a KV cache of {self.max_tokens} tokens"
            )
        self.k[:, start:end] = k
        self.v[:, start:end] = v

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``[0, end)``: views ``[kv_heads_local, end, head_dim]``."""
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """Every layer's :class:`LayerKV` for one sequence."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        max_tokens: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        place = torch.device(device)
        self.layers = [LayerKV(kv_heads, max_tokens, head_dim, dtype, place) for _ in range(layers)]
        self.max_tokens = max_tokens

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

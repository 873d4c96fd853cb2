"""Megatron-style tensor-parallel layers that load only their shard from a
:class:`~tidal.inference_worker.weights.source.TensorSource`.

A rank reads rows (column-parallel: its output features) or columns (row-parallel: its input
features) of each weight, never the whole tensor, so a 70B checkpoint is read once across the
ranks, not ``world`` times.

No layer communicates except the LM head's gather: a row-parallel layer returns this rank's
PARTIAL sum, and :class:`VocabParallelEmbedding` returns this rank's partial lookup (zeros for
ids outside its shard). The caller all-reduces, so the ISO schedule can overlap an all-reduce
with the next computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional

from tidal.inference_worker.parallel.comm import Comm
from tidal.inference_worker.weights.source import TensorSource


@dataclass(frozen=True)
class Placement:
    """Where a rank's weights live and in which dtype (the checkpoint's are cast on load)."""

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()


def shard(size: int, rank: int, world: int) -> slice:
    """Rank's contiguous part of ``size`` features: balanced, the first ``size % world`` ranks
    one larger (a row-parallel sum does not need equal parts)."""
    base, extra = divmod(size, world)
    begin = rank * base + min(rank, extra)
    return slice(begin, begin + base + (1 if rank < extra else 0))


def head_shard(heads: int, head_dim: int, rank: int, world: int) -> slice:
    """The rows of a Q/K/V projection that hold this rank's whole heads."""
    local = heads // world
    return slice(rank * local * head_dim, (rank + 1) * local * head_dim)


class ColumnParallelLinear:
    """``y = x Wᵀ + b`` for this rank's output features: rows ``rows`` of W and of b."""

    def __init__(
        self,
        source: TensorSource,
        name: str,
        rows: slice,
        placement: Placement,
        bias: bool = False,
    ) -> None:
        self.weight = placement.put(source.get(f"{name}.weight", rows=rows))  # [out_local, in]
        self.bias = placement.put(source.get(f"{name}.bias", rows=rows)) if bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)  # [T, out_local]


class MergedColumnParallelLinear:
    """Several column-parallel projections of one input in one matmul (gate+up, q+k+v): their
    row shards stacked; the output split back in order."""

    def __init__(
        self,
        source: TensorSource,
        parts: list[tuple[str, slice]],
        placement: Placement,
        bias: bool = False,
    ) -> None:
        weights = [source.get(f"{name}.weight", rows=rows) for name, rows in parts]
        self.sizes = [w.shape[0] for w in weights]
        self.weight = placement.put(torch.cat(weights, dim=0))  # [sum(out_local), in]
        self.bias = (
            placement.put(torch.cat([source.get(f"{n}.bias", rows=r) for n, r in parts]))
            if bias
            else None
        )

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = functional.linear(x, self.weight, self.bias)  # [T, sum(out_local)]
        return list(torch.split(out, self.sizes, dim=-1))


class GateUpParallelLinear(MergedColumnParallelLinear):
    """The SwiGLU MLP's gate and up projections, this rank's ``intermediate`` features of each."""

    def __init__(
        self, source: TensorSource, prefix: str, intermediate: int, comm: Comm, placement: Placement
    ) -> None:
        rows = shard(intermediate, comm.rank, comm.world)
        super().__init__(
            source, [(f"{prefix}.gate_proj", rows), (f"{prefix}.up_proj", rows)], placement
        )


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V for this rank's whole heads (``heads / world`` query heads, ``kv_heads /
    world`` KV heads); Qwen2's biases sliced the same way."""

    def __init__(
        self,
        source: TensorSource,
        prefix: str,
        heads: int,
        kv_heads: int,
        head_dim: int,
        comm: Comm,
        placement: Placement,
        bias: bool = False,
    ) -> None:
        q_rows = head_shard(heads, head_dim, comm.rank, comm.world)
        kv_rows = head_shard(kv_heads, head_dim, comm.rank, comm.world)
        parts = [
            (f"{prefix}.q_proj", q_rows),
            (f"{prefix}.k_proj", kv_rows),
            (f"{prefix}.v_proj", kv_rows),
        ]
        super().__init__(source, parts, placement, bias=bias)


class RowParallelLinear:
    """``x_local W_localᵀ``: this rank's input features (columns ``cols`` of W); returns the
    PARTIAL sum, which the caller all-reduces. A bias, if any, is added on rank 0 only so that
    the reduced sum holds it once."""

    def __init__(
        self,
        source: TensorSource,
        name: str,
        cols: slice,
        comm: Comm,
        placement: Placement,
        bias: bool = False,
    ) -> None:
        self.weight = placement.put(source.get(f"{name}.weight", cols=cols))  # [out, in_local]
        self.bias = placement.put(source.get(f"{name}.bias")) if bias and comm.rank == 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)  # [T, out] partial


def vocab_shard(vocab: int, rank: int, world: int) -> tuple[slice, int]:
    """Rank's token ids and the padded shard size: every shard is ``ceil(vocab / world)`` rows
    (the last zero-padded) because ``gather_last_dim`` needs equal parts on every rank."""
    size = -(-vocab // world)
    begin = min(rank * size, vocab)
    return slice(begin, min(begin + size, vocab)), size


def _padded_rows(
    source: TensorSource, name: str, rows: slice, size: int, placement: Placement
) -> torch.Tensor:
    weight = source.get(name, rows=rows)  # [rows, d]
    if weight.shape[0] < size:
        pad = weight.new_zeros((size - weight.shape[0], *weight.shape[1:]))
        weight = torch.cat([weight, pad], dim=0)
    return placement.put(weight)  # [size, d]


class VocabParallelEmbedding:
    """This rank's rows of the token embedding. Returns the PARTIAL lookup: the embedding of
    ids in this rank's shard and zeros for the others; the caller all-reduces it
    (:meth:`LlamaModel.embed` does), which leaves every id's row on every rank."""

    def __init__(
        self, source: TensorSource, name: str, vocab: int, comm: Comm, placement: Placement
    ) -> None:
        rows, self.size = vocab_shard(vocab, comm.rank, comm.world)
        self.begin: int = rows.start
        self.count: int = rows.stop - rows.start  # the real rows, without the padding
        self.weight = _padded_rows(source, name, rows, self.size, placement)  # [size, d]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.begin  # [T]
        inside = (local >= 0) & (local < self.count)
        out = functional.embedding(local.clamp(0, self.size - 1), self.weight)  # [T, d]
        return out * inside.unsqueeze(-1).to(out.dtype)


class ParallelLMHead:
    """Logits for this rank's vocabulary rows, gathered to rank 0 (None on the others).
    Tied embeddings reuse the embedding's shard (the same rows of the same tensor)."""

    def __init__(
        self,
        source: TensorSource | None,
        name: str,
        vocab: int,
        comm: Comm,
        placement: Placement,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        self.comm = comm
        self.vocab = vocab
        if tied is not None:
            self.weight = tied.weight  # [size, d]
        else:
            assert source is not None
            rows, size = vocab_shard(vocab, comm.rank, comm.world)
            self.weight = _padded_rows(source, name, rows, size, placement)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        local = functional.linear(x, self.weight)  # [n, size]
        logits = self.comm.gather_last_dim(local)  # [n, size * world] on rank 0
        if logits is None:
            return None
        trimmed: torch.Tensor = logits[..., : self.vocab]  # [n, vocab]
        return trimmed

"""One rank's forward step over the paged KV cache.

The cache is one key and one value tensor per layer, ``[num_blocks · block_size, KVl, D]``:
slot ``b · block_size + i`` is position i of block b. A step's work (:class:`StepWork`, built
by rank 0 from the scheduler's plan and broadcast, so every rank runs the same step) packs the
new tokens of every scheduled sequence along one axis: the linear layers run once over all of
them, attention runs per sequence for prompt chunks (their keys gathered through the block
table; the ``int8`` backend applies there) and as one padded, masked SDPA call for all the
single-token decodes. A prompt chunk alone in its step, long enough, at tensor parallelism
above 1 runs the ISO schedule instead (:mod:`tidal.inference_worker.iso`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional

from tidal.inference_worker.attention import attend
from tidal.inference_worker.iso import prefill_iso
from tidal.inference_worker.model.llama import LlamaModel


@dataclass(frozen=True)
class Segment:
    """``count`` new tokens of one sequence at positions ``start ..``, in ``blocks``."""

    start: int
    count: int
    blocks: tuple[int, ...]
    sample: bool  # its last token's logits are wanted


@dataclass(frozen=True)
class StepWork:
    """What every rank computes in one step (small and picklable: it is broadcast)."""

    ids: tuple[int, ...]  # the segments' tokens, packed in segment order
    segments: tuple[Segment, ...]
    iso_split: int | None = None  # ISO prefill of a lone segment, split here


class PagedKV:
    """The cache tensors of every layer on this rank, ``[num_blocks, block_size, KVl, D]``.

    Reads gather whole blocks (``index_select`` of contiguous block_size-row slabs), not
    single slots: on a CPU that is a handful of memcpys per sequence instead of a per-row
    advanced index, which profiled as a third of a batch-32 decode step."""

    def __init__(
        self,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.block_size = block_size
        self.device = device

    @staticmethod
    def bytes_per_block(
        layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * block_size * kv_heads * head_dim * element

    def slots(self, blocks: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices ``[end - start]`` of positions ``[start, end)`` of a sequence."""
        positions = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        slots = table[positions // self.block_size] * self.block_size
        return (slots + positions % self.block_size).to(self.device)

    def blocks_tensor(self, blocks: Sequence[int], end: int) -> torch.Tensor:
        """The ids of the blocks holding positions ``[0, end)``."""
        used = -(-end // self.block_size)
        return torch.tensor(blocks[:used], dtype=torch.long, device=self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ``[KVl, T, D]`` at flat ``slots`` ``[T]``."""
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.transpose(0, 1))

    def read(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole ``blocks`` ``[n]``: ``[n, block_size, KVl, D]`` each."""
        return self.k[layer].index_select(0, blocks), self.v[layer].index_select(0, blocks)


class PagedBatch:
    """The attention of one step's packed tokens (implements ``model.llama.BatchAttention``)."""

    def __init__(self, kv: PagedKV, segments: Sequence[Segment]) -> None:
        self.kv = kv
        device = kv.device
        positions, write_slots = [], []
        self.prompts: list[tuple[int, int, int, torch.Tensor]] = []  # rows a..b, start, blocks
        decode_rows, decode_blocks, decode_lengths = [], [], []
        row = 0
        for seg in segments:
            end = seg.start + seg.count
            positions.append(torch.arange(seg.start, end))
            write_slots.append(kv.slots(seg.blocks, seg.start, end))
            if seg.count == 1:
                decode_rows.append(row)
                decode_blocks.append(seg.blocks[: -(-end // kv.block_size)])
                decode_lengths.append(end)
            else:
                self.prompts.append(
                    (row, row + seg.count, seg.start, kv.blocks_tensor(seg.blocks, end))
                )
            row += seg.count
        self.positions = torch.cat(positions).to(device)  # [T]
        self.write_slots = torch.cat(write_slots)  # [T]
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        if decode_rows:
            widest = max(len(b) for b in decode_blocks)
            padded = [list(b) + [0] * (widest - len(b)) for b in decode_blocks]  # pad: masked
            self.decode_blocks = torch.tensor(padded, dtype=torch.long, device=device)  # [B, nb]
            keys = widest * kv.block_size
            lengths = torch.tensor(decode_lengths, device=device)
            # [B, 1, 1, L]: a decode query sees its own sequence's keys only
            visible = torch.arange(keys, device=device)[None] < lengths[:, None]
            self.decode_mask = visible[:, None, None]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
    ) -> torch.Tensor:
        self.kv.write(layer, self.write_slots, k, v)
        out = torch.empty_like(q)  # [Hl, T, D]
        for first, last, start, blocks in self.prompts:
            keys, values = self._contiguous(layer, blocks, last - first + start)
            out[:, first:last] = attend(q[:, first:last], keys, values, start, backend)
        if self.decode_rows.numel():
            out[:, self.decode_rows] = self._decode(layer, q)
        return out

    def _contiguous(
        self, layer: int, blocks: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values of positions ``[0, end)``: ``[KVl, end, D]``."""
        keys, values = self.kv.read(layer, blocks)  # [nb, bs, KVl, D]
        flat = (keys.flatten(0, 1)[:end], values.flatten(0, 1)[:end])  # [end, KVl, D]
        return flat[0].transpose(0, 1), flat[1].transpose(0, 1)

    def _decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Every single-token query in one masked SDPA call: ``[Hl, B, D]``."""
        batch, widest = self.decode_blocks.shape
        keys, values = self.kv.read(layer, self.decode_blocks.view(-1))  # [B·nb, bs, KVl, D]
        shape = (batch, widest * self.kv.block_size, *keys.shape[2:])
        k = keys.view(shape).transpose(1, 2)  # [B, KVl, L, D]
        v = values.view(shape).transpose(1, 2)
        queries = q[:, self.decode_rows].transpose(0, 1)[:, :, None]  # [B, Hl, 1, D]
        out = functional.scaled_dot_product_attention(
            queries, k, v, attn_mask=self.decode_mask, enable_gqa=q.shape[0] != k.shape[1]
        )  # [B, Hl, 1, D]
        return out[:, :, 0].transpose(0, 1)


class _SequenceLayerKV:
    """One sequence's view of one layer of the paged cache with the contiguous cache's
    interface (``write``/``read``), so that ISO prefill runs on it unchanged."""

    def __init__(self, kv: PagedKV, layer: int, blocks: Sequence[int]) -> None:
        self.kv, self.layer, self.blocks = kv, layer, blocks

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv.write(self.layer, self.kv.slots(self.blocks, start, start + k.shape[1]), k, v)

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.read(self.layer, self.kv.blocks_tensor(self.blocks, end))
        return (
            keys.flatten(0, 1)[:end].transpose(0, 1),
            values.flatten(0, 1)[:end].transpose(0, 1),
        )


class _SequenceKV:
    def __init__(self, kv: PagedKV, blocks: Sequence[int], layers: int) -> None:
        self.layers = [_SequenceLayerKV(kv, i, blocks) for i in range(layers)]

    def __getitem__(self, layer: int) -> _SequenceLayerKV:
        return self.layers[layer]


class ModelRunner:
    """A rank's model and its share of the paged cache."""

    def __init__(
        self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int
    ) -> None:
        spec = model.spec
        self.model = model
        self.kv = PagedKV(
            spec.layers, num_blocks, block_size, spec.kv_heads // model.comm.world,
            spec.head_dim, model.placement.dtype, model.placement.device,
        )  # fmt: skip
        model.rope.reserve(max_model_len)

    @torch.inference_mode()
    def execute(self, work: StepWork) -> torch.Tensor | None:
        """Run one step; the logits ``[sampled segments, vocab]`` on rank 0, None elsewhere."""
        model = self.model
        ids = torch.tensor(work.ids, dtype=torch.long, device=self.kv.device)
        if work.iso_split is not None:
            (segment,) = work.segments
            cache = _SequenceKV(self.kv, segment.blocks, len(model.layers))
            hidden = prefill_iso(model, ids, cache, work.iso_split, start=segment.start)
        else:
            hidden = model.forward_batch(ids, PagedBatch(self.kv, work.segments))
        rows = _last_rows(work.segments)
        if not rows:
            model.logits(hidden[:0])  # the LM head's gather is a collective: every rank joins
            return None
        return model.logits(hidden[torch.tensor(rows, device=hidden.device)])


def _last_rows(segments: Sequence[Segment]) -> list[int]:
    """Packed indices of the last token of each sampling segment."""
    rows, row = [], 0
    for seg in segments:
        row += seg.count
        if seg.sample:
            rows.append(row - 1)
    return rows

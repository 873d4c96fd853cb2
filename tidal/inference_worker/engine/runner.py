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
    """The cache tensors of every layer on this rank."""

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
        shape = (num_blocks * block_size, kv_heads, head_dim)
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
        """Slot indices ``[end - start]`` of positions ``[start, end)`` of a sequence."""
        positions = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return (
            table[positions // self.block_size] * self.block_size + positions % self.block_size
        ).to(self.device)


class PagedBatch:
    """The attention of one step's packed tokens (implements ``model.llama.BatchAttention``)."""

    def __init__(self, kv: PagedKV, segments: Sequence[Segment]) -> None:
        self.kv = kv
        device = kv.device
        positions, write_slots = [], []
        self.prompts: list[tuple[int, int, int, torch.Tensor]] = []  # rows a..b, start, key slots
        decode_rows, decode_slots, decode_lengths = [], [], []
        row = 0
        for seg in segments:
            end = seg.start + seg.count
            positions.append(torch.arange(seg.start, end))
            write_slots.append(kv.slots(seg.blocks, seg.start, end))
            if seg.count == 1:
                decode_rows.append(row)
                decode_slots.append(kv.slots(seg.blocks, 0, end))
                decode_lengths.append(end)
            else:
                self.prompts.append((row, row + seg.count, seg.start, kv.slots(seg.blocks, 0, end)))
            row += seg.count
        self.positions = torch.cat(positions).to(device)  # [T]
        self.write_slots = torch.cat(write_slots)  # [T]
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        if decode_rows:
            longest = max(decode_lengths)
            padded = torch.zeros(len(decode_rows), longest, dtype=torch.long, device=device)
            for i, slots in enumerate(decode_slots):
                padded[i, : slots.shape[0]] = slots
            lengths = torch.tensor(decode_lengths, device=device)
            self.decode_slots = padded  # [B, L]
            # [B, 1, 1, L]: a decode query sees its own sequence's keys only
            self.decode_mask = (torch.arange(longest, device=device)[None] < lengths[:, None])[
                :, None, None
            ]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
    ) -> torch.Tensor:
        keys, values = self.kv.k[layer], self.kv.v[layer]  # [slots, KVl, D]
        keys[self.write_slots] = k.transpose(0, 1)
        values[self.write_slots] = v.transpose(0, 1)
        out = torch.empty_like(q)  # [Hl, T, D]
        for first, last, start, slots in self.prompts:
            out[:, first:last] = attend(
                q[:, first:last], keys[slots].transpose(0, 1), values[slots].transpose(0, 1),
                start, backend,
            )  # fmt: skip
        if self.decode_rows.numel():
            out[:, self.decode_rows] = self._decode(q, keys, values)
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Every single-token query in one masked SDPA call: ``[Hl, B, D]``."""
        queries = q[:, self.decode_rows].transpose(0, 1)[:, :, None]  # [B, Hl, 1, D]
        k = keys[self.decode_slots].permute(0, 2, 1, 3)  # [B, KVl, L, D]
        v = values[self.decode_slots].permute(0, 2, 1, 3)
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
        slots = self.kv.slots(self.blocks, start, start + k.shape[1])
        self.kv.k[self.layer][slots] = k.transpose(0, 1)
        self.kv.v[self.layer][slots] = v.transpose(0, 1)

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.kv.slots(self.blocks, 0, end)
        return self.kv.k[self.layer][slots].transpose(0, 1), self.kv.v[self.layer][slots].transpose(
            0, 1
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

"""The Llama-family decoder (``llama``, ``mistral``, ``qwen2``) with tensor parallelism.

Each rank holds whole attention heads and a slice of the MLP's intermediate features
(:mod:`tidal.inference_worker.parallel.layers`). A :class:`DecoderLayer` returns PARTIAL sums
(before the all-reduce) so that the ISO schedule can overlap one rank's all-reduce with the
next computation; :meth:`LlamaModel.forward` is the serial schedule:

    x = x + all_reduce(layer.attention_partial(x, positions, kv, start))
    x = x + all_reduce(layer.mlp_partial(x))

The numerics follow Hugging Face transformers' Llama/Qwen2 (RMSNorm in float32 or wider,
RoPE frequencies in float32, the llama3 frequency scaling of ``_compute_llama3_parameters``),
which the tests use as the oracle; this package never imports transformers.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.nn import functional

from tidal.inference_worker.attention import BACKENDS, attend
from tidal.inference_worker.kvcache import KVCache, LayerKV
from tidal.inference_worker.model.spec import ModelSpec, RopeScaling
from tidal.inference_worker.parallel.comm import Comm
from tidal.inference_worker.parallel.layers import (
    GateUpParallelLinear,
    ParallelLMHead,
    Placement,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_shard,
    shard,
)
from tidal.inference_worker.weights.source import TensorSource


class BatchAttention(Protocol):
    """Packed tokens of several sequences and how to attend for them (the engine's paged
    cache: :class:`tidal.inference_worker.engine.runner.PagedBatch`)."""

    positions: torch.Tensor  # [T]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
    ) -> torch.Tensor:
        """Store k, v ``[KVl, T, D]`` of ``layer``; attention output ``[Hl, T, D]``."""
        ...


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the model's dtype when wider (fp64 runs keep their precision)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm:
    """``w * x / sqrt(mean(x²) + eps)``, computed in float32 (or wider) as transformers does."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight  # [d]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(_wide(x.dtype))  # [T, d]
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``[head_dim / 2]`` in float32, llama3-scaled when asked:
    long wavelengths divided by ``factor``, short ones kept, the band between interpolated
    (transformers' ``_compute_llama3_parameters``, operation for operation)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rope:
    """Rotary position embedding, rotate-half layout (the Hugging Face checkpoints' order)."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.inv_freq = inv_freq.to(device=device, dtype=_wide(dtype))  # [D/2]
        self.dtype = dtype
        empty = torch.empty(0, inv_freq.shape[0] * 2, dtype=dtype, device=device)
        self._cos, self._sin = empty, empty  # [positions computed so far, D]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, D]`` for ``positions`` ``[T]``: rows of the table :meth:`reserve`
        computed (positions stay below the KV cache's length, which reserved them)."""
        return self._cos[positions], self._sin[positions]

    def reserve(self, length: int) -> None:
        """Make the table cover positions ``[0, length)`` (grown by doubling, computed once:
        not per layer and step, and with no device sync on the hot path)."""
        if length > self._cos.shape[0]:
            self._grow(max(length, 2 * self._cos.shape[0], 256))

    def _grow(self, length: int) -> None:
        steps = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = steps[:, None] * self.inv_freq[None, :]  # [L, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [L, D]
        self._cos, self._sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x ``[H, T, D]`` rotated by position."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class DecoderLayer:
    """One decoder layer's shard on this rank. Both methods return PARTIAL sums: the caller
    (the serial :meth:`LlamaModel.forward` or the ISO schedule) all-reduces them."""

    def __init__(
        self,
        spec: ModelSpec,
        index: int,
        source: TensorSource,
        comm: Comm,
        placement: Placement,
        rope: Rope,
        attention: str = "sdpa",
    ) -> None:
        prefix = f"model.layers.{index}"
        rank, world = comm.rank, comm.world
        self.heads = spec.heads // world
        self.kv_heads = spec.kv_heads // world
        self.head_dim = spec.head_dim
        self.rope = rope
        self.attention = attention
        self.input_norm = RMSNorm(
            placement.put(source.get(f"{prefix}.input_layernorm.weight")), spec.rms_eps
        )
        self.post_norm = RMSNorm(
            placement.put(source.get(f"{prefix}.post_attention_layernorm.weight")), spec.rms_eps
        )
        self.qkv = QKVParallelLinear(
            source, f"{prefix}.self_attn", spec.heads, spec.kv_heads, spec.head_dim, comm,
            placement, bias=spec.qkv_bias,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            source,
            f"{prefix}.self_attn.o_proj",
            head_shard(spec.heads, spec.head_dim, rank, world),
            comm,
            placement,
        )
        self.gate_up = GateUpParallelLinear(
            source, f"{prefix}.mlp", spec.intermediate_size, comm, placement
        )
        self.down_proj = RowParallelLinear(
            source,
            f"{prefix}.mlp.down_proj",
            shard(spec.intermediate_size, rank, world),
            comm,
            placement,
        )

    def attention_partial(
        self, x: torch.Tensor, positions: torch.Tensor, kv: LayerKV, start: int
    ) -> torch.Tensor:
        """input_layernorm, this rank's heads of attention for the T tokens at positions
        ``start .. start + T - 1`` (their k, v written to ``kv`` at ``[start, start + T)``,
        attending causally to ``kv[0, start + T)``), and this rank's partial o_proj
        ``[T, d]``, before the all-reduce."""
        q, k, v = self._qkv(x, positions)
        kv.write(start, k, v)
        keys, values = kv.read(start + x.shape[0])  # [KVl, start + T, D]
        return self._output(attend(q, keys, values, start, self.attention), x.dtype)

    def attention_batch(self, x: torch.Tensor, batch: BatchAttention, layer: int) -> torch.Tensor:
        """:meth:`attention_partial` for the tokens of many sequences packed along T: ``batch``
        stores their keys and values in the paged cache and attends per sequence."""
        q, k, v = self._qkv(x, batch.positions)
        return self._output(batch.attend(layer, q, k, v, self.attention), x.dtype)

    def _qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[Hl, T, D]``, k and v ``[KVl, T, D]`` of this rank's heads, RoPE applied."""
        t = x.shape[0]
        q, k, v = self.qkv(self.input_norm(x))  # [T, Hl·D], [T, KVl·D], [T, KVl·D]
        q = q.view(t, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = self.rope.cos_sin(positions)  # [T, D]
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v

    def _output(self, attended: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's partial o_proj ``[T, d]`` of the attention output ``[Hl, T, D]``."""
        t = attended.shape[1]
        out = attended.to(dtype).transpose(0, 1).reshape(t, self.heads * self.head_dim)
        return self.o_proj(out)

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        """post_attention_layernorm, SwiGLU on this rank's intermediate features, and the
        partial down_proj ``[T, d]``, before the all-reduce."""
        gate, up = self.gate_up(self.post_norm(x))  # [T, I_local] each
        return self.down_proj(functional.silu(gate) * up)  # [T, d] partial


class LlamaModel:
    """The whole decoder on this rank: embedding, layers, final norm and LM head, for one
    sequence at a time (batch 1)."""

    def __init__(
        self,
        spec: ModelSpec,
        source: TensorSource,
        comm: Comm,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention: str = "sdpa",
    ) -> None:
        spec.check_tensor_parallel(comm.world)
        if attention not in BACKENDS:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(BACKENDS)}")
        self.spec = spec
        self.comm = comm
        self.placement = Placement(dtype, torch.device(device))
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        rope = self.rope = Rope(inv_freq, dtype, self.placement.device)
        self.embedding = VocabParallelEmbedding(
            source, "model.embed_tokens.weight", spec.vocab_size, comm, self.placement
        )
        self.layers = [
            DecoderLayer(spec, i, source, comm, self.placement, rope, attention)
            for i in range(spec.layers)
        ]
        self.norm = RMSNorm(self.placement.put(source.get("model.norm.weight")), spec.rms_eps)
        self.lm_head = ParallelLMHead(
            None if spec.tie_embeddings else source,
            "lm_head.weight",
            spec.vocab_size,
            comm,
            self.placement,
            tied=self.embedding if spec.tie_embeddings else None,
        )

    def new_cache(self, max_tokens: int) -> KVCache:
        """An empty cache for one sequence of up to ``max_tokens`` tokens, this rank's KV heads."""
        self.rope.reserve(max_tokens)
        return KVCache(
            self.spec.layers, self.spec.kv_heads // self.comm.world, max_tokens,
            self.spec.head_dim, self.placement.dtype, self.placement.device,
        )  # fmt: skip

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[T]`` to the residual stream ``[T, d]`` (all-reduced: every rank holds
        the rows its shard lacks)."""
        return self.comm.all_reduce(self.embedding(ids.to(self.placement.device)))

    def logits(self, x_last: torch.Tensor) -> torch.Tensor | None:
        """Final norm and LM head on hidden states ``[n, d]``: logits ``[n, vocab]`` on rank 0,
        None on the others."""
        return self.lm_head(self.norm(x_last))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Hidden states ``[T, d]`` of tokens ``ids`` ``[T]`` at positions ``start ..``, the
        serial schedule (each all-reduce before the next computation)."""
        x = self.embed(ids)  # [T, d]
        positions = torch.arange(start, start + ids.shape[0], device=x.device)  # [T]
        for i, layer in enumerate(self.layers):
            x = x + self.comm.all_reduce(layer.attention_partial(x, positions, cache[i], start))
            x = x + self.comm.all_reduce(layer.mlp_partial(x))
        return x

    @torch.inference_mode()
    def forward_batch(self, ids: torch.Tensor, batch: BatchAttention) -> torch.Tensor:
        """Hidden states ``[T, d]`` of the packed tokens ``ids`` ``[T]`` of several sequences
        (continuous batching): every linear layer runs once over all of them."""
        x = self.embed(ids)  # [T, d]
        for i, layer in enumerate(self.layers):
            x = x + self.comm.all_reduce(layer.attention_batch(x, batch, i))
            x = x + self.comm.all_reduce(layer.mlp_partial(x))
        return x

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Fill ``cache`` with the prompt ``ids`` ``[T]``; the last token's logits ``[vocab]``
        on rank 0 (None elsewhere)."""
        x = self.forward(ids, cache, 0)
        logits = self.logits(x[-1:])
        return None if logits is None else logits[0]

    @torch.inference_mode()
    def decode_step(self, token_id: int, cache: KVCache, position: int) -> torch.Tensor | None:
        """One token at ``position`` (its predecessors are in ``cache``); logits ``[vocab]`` on
        rank 0 (None elsewhere)."""
        ids = torch.tensor([token_id], dtype=torch.long)
        logits = self.logits(self.forward(ids, cache, position))
        return None if logits is None else logits[0]

    def greedy(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        """Greedy decoding of ``new_tokens`` after the prompt ``ids`` ``[T]``; rank 0 picks each
        token and broadcasts it, so every rank returns the same list."""
        cache = self.new_cache(ids.shape[0] + new_tokens)
        logits = self.prefill(ids, cache)
        out: list[int] = []
        for step in range(new_tokens):
            token = int(self.comm.broadcast_object(_argmax(logits)))
            out.append(token)
            if step + 1 < new_tokens:
                logits = self.decode_step(token, cache, ids.shape[0] + step)
        return out


def _argmax(logits: torch.Tensor | None) -> int | None:
    return None if logits is None else int(logits.argmax())

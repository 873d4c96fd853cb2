"""What a Llama-family checkpoint is, independent of its file format (pure: no torch).

``llama``, ``mistral`` and ``qwen2`` share one decoder: RMSNorm, rotary position embedding
(optionally with llama3 ``rope_scaling``), grouped-query attention, a SwiGLU MLP, and tied or
separate input and output embeddings; Qwen2 adds biases to the Q, K and V projections. The
weight loaders (:mod:`tidal.inference_worker.weights`) read a spec from ``config.json`` or GGUF
metadata; the model is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("llama", "mistral", "qwen2")


class SpecError(ValueError):
    """A checkpoint the worker cannot run; the message names the file or field."""


@dataclass(frozen=True)
class RopeScaling:
    """llama3's frequency-dependent RoPE scaling (Llama 3.1+ ``rope_scaling``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SpecError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if self.heads % self.kv_heads:
            raise SpecError(
                f"{self.heads} attention heads are not a multiple of {self.kv_heads} KV heads"
            )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def check_tensor_parallel(self, tp: int) -> None:
        """TP must divide the query and KV heads (each rank holds whole heads)."""
        if tp < 1 or self.heads % tp or self.kv_heads % tp:
            raise SpecError(
                f"tensor parallelism {tp} does not divide the model's {self.heads} attention "
                f"heads and {self.kv_heads} KV heads; use a TP that divides both "
                f"({', '.join(str(t) for t in self.tensor_parallel_sizes())})"
            )

    def tensor_parallel_sizes(self, limit: int = 8) -> list[int]:
        return [t for t in range(1, limit + 1) if self.heads % t == 0 and self.kv_heads % t == 0]

"""GGUF files (llama.cpp): metadata to a :class:`ModelSpec` and the tokenizer's vocabulary, and
the tensors, renamed to Hugging Face names and dequantized, as a
:class:`~tidal.inference_worker.weights.source.TensorSource`.

llama.cpp's converter permutes the rows of Q and K of ``llama`` checkpoints (it pairs rotary
dimensions as GPT-J does, interleaved; Hugging Face splits them into halves); :class:`GGUFSource`
undoes that, so its tensors equal the Hugging Face checkpoint's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tidal.inference_worker.model.spec import ModelSpec, SpecError
from tidal.inference_worker.tokenizer import GGUFVocab
from tidal.inference_worker.weights.hf import MissingTensorError, WeightsError
from tidal.inference_worker.weights.source import slice_tensor

Q = gguf.GGMLQuantizationType

# What gguf.quants.dequantize handles and we have checked; anything else is refused up front,
# naming the tensor, rather than half-way through a load.
SUPPORTED_TYPES = frozenset(
    {
        Q.F32,
        Q.F16,
        Q.BF16,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q8_0,
        Q.Q2_K,
        Q.Q3_K,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
    }
)

# general.architecture values we run; llama.cpp writes Mistral 7B-style models as "llama".
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# Converters that apply convert_hf_to_gguf's ``permute`` to Q and K (LlamaModel and those
# deriving from it); Qwen2Model does not.
PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the decoder has no use for."""
    if match := _BLOCK.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        return None
    if (match := _GLOBAL.fullmatch(gguf_name)) and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    return None


def unpermute(weight: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """Inverse of convert_hf_to_gguf's ``permute(w, n_head)``, which is
    ``w.reshape(n, 2, rows // n // 2, *rest).swapaxes(1, 2).reshape(w.shape)``."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise SpecError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class _Metadata:
    def __init__(self, reader: gguf.GGUFReader, origin: str) -> None:
        self.fields = reader.fields
        self.origin = origin

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise SpecError(f"{self.origin}: metadata {key!r} is unreadable: {e}") from e

    def require(self, key: str, kind: type[int] | type[float]) -> Any:
        value = self.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(
                f"{self.origin}: metadata {key!r} is missing or not a number (got {value!r})"
            )
        return kind(value)


def _decimal(value: float) -> float:
    """A FLOAT32 metadata value as the decimal it was written from (1e-05, not
    9.999999747378752e-06): the shortest repr that rounds to the same float32."""
    return float(str(np.float32(value)))


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, unknown version
        raise WeightsError(f"GGUF file {path} is corrupt or unreadable: {e}") from e


def spec_from_gguf(reader: gguf.GGUFReader, origin: str) -> ModelSpec:
    meta = _Metadata(reader, origin)
    arch_name = meta.get("general.architecture")
    if arch_name not in GGUF_ARCHITECTURES:
        raise SpecError(
            f"{origin}: general.architecture {arch_name!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    a = arch_name
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise SpecError(
            f"{origin}: the file scales RoPE with a rope_freqs tensor (Llama 3.1 style), which "
            "is not supported from GGUF yet; use the Hugging Face checkpoint"
        )
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise SpecError(f"{origin}: metadata {a}.rope.scaling.type {scaling!r} is not supported")
    hidden = meta.require(f"{a}.embedding_length", int)
    heads = meta.require(f"{a}.attention.head_count", int)
    kv_heads = (
        meta.require(f"{a}.attention.head_count_kv", int)
        if meta.get(f"{a}.attention.head_count_kv") is not None
        else heads
    )
    head_dim = (
        meta.require(f"{a}.attention.key_length", int)
        if meta.get(f"{a}.attention.key_length") is not None
        else hidden // heads
    )
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise SpecError(f"{origin}: neither {a}.vocab_size nor token_embd.weight is present")
        vocab = int(embed.shape[-1])
    return ModelSpec(
        architecture=GGUF_ARCHITECTURES[a],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=meta.require(f"{a}.feed_forward_length", int),
        layers=meta.require(f"{a}.block_count", int),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=_decimal(meta.require(f"{a}.attention.layer_norm_rms_epsilon", float)),
        rope_theta=_decimal(float(meta.get(f"{a}.rope.freq_base", 10000.0))),
        max_position=meta.require(f"{a}.context_length", int),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias=a == "qwen2",
    )


def vocab_from_gguf(reader: gguf.GGUFReader, origin: str) -> GGUFVocab:
    meta = _Metadata(reader, origin)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(model, str) or not isinstance(tokens, list):
        raise SpecError(f"{origin}: metadata tokenizer.ggml.model/tokens is missing")
    eos_extra = tuple(
        int(v)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if isinstance(v := meta.get(key), int)
    )

    def optional_id(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    template = meta.get("tokenizer.chat_template")
    return GGUFVocab(
        model=model,
        tokens=tokens,
        merges=list(meta.get("tokenizer.ggml.merges", [])),
        token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type", [])],
        pre=meta.get("tokenizer.ggml.pre"),
        bos_token_id=optional_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=optional_id("tokenizer.ggml.eos_token_id"),
        unk_token_id=optional_id("tokenizer.ggml.unknown_token_id"),
        pad_token_id=optional_id("tokenizer.ggml.padding_token_id"),
        extra_eos_token_ids=eos_extra,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        origin=origin,
    )


class GGUFSource:
    """A GGUF file's tensors in Hugging Face names, dequantized to float32 on first request
    and kept (``clear`` drops them once the model holds its copies).

    A rank's slice is cut after dequantizing the whole tensor: quantisation blocks run along a
    row (32 or 256 values of the innermost dimension), so cutting columns would split blocks
    and cutting rows still needs a per-row decode; the tensors of models small enough to ship
    as GGUF make a whole-tensor decode cheap, so we keep it simple."""

    def __init__(self, path: str | Path, reader: gguf.GGUFReader, spec: ModelSpec) -> None:
        self.path = Path(path)
        self.spec = spec
        self._tensors: dict[str, gguf.ReaderTensor] = {}
        self._cache: dict[str, torch.Tensor] = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                raise SpecError(
                    f"{self.path}: tensor {tensor.name!r} has no counterpart in the "
                    f"{spec.architecture} decoder"
                )
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise WeightsError(
                    f"{self.path}: tensor {tensor.name!r} is quantised as "
                    f"{tensor.tensor_type.name}, which is not supported (supported: "
                    f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
                )
            self._tensors[name] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def quant_type(self, name: str) -> str:
        """The GGML type ``name`` is stored as (``Q4_1``, ``F32``, ...)."""
        return self._tensor(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` as Hugging Face writes it (rows first), without decoding it."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def _tensor(self, name: str) -> gguf.ReaderTensor:
        if name not in self._tensors:
            raise MissingTensorError(f"GGUF file {self.path} has no tensor {name!r}")
        return self._tensors[name]

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, dequantized to float32 (cached)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        tensor = self._tensor(name)
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise WeightsError(
                f"{self.path}: cannot dequantize tensor {tensor.name!r} "
                f"({tensor.tensor_type.name}): {e}"
            ) from e
        # numpy's shape is already (rows, cols) as Hugging Face stores it (GGUF lists dims
        # innermost first).
        array = np.asarray(array, dtype=np.float32)
        if self.spec.architecture in PERMUTED_ARCHITECTURES:
            if name.endswith("self_attn.q_proj.weight"):
                array = unpermute(array, self.spec.heads)
            elif name.endswith("self_attn.k_proj.weight"):
                array = unpermute(array, self.spec.kv_heads)
        if not (array.flags.writeable and array.flags.c_contiguous):  # a view of the mmap
            array = np.array(array, order="C", copy=True)
        result = torch.from_numpy(array)
        self._cache[name] = result
        return result

    def get(
        self,
        name: str,
        rows: slice | None = None,
        cols: slice | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
    ) -> torch.Tensor:
        tensor = slice_tensor(self.full(name), rows, cols)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def clear(self) -> None:
        """Drop the dequantized tensors kept so far."""
        self._cache.clear()


def load_gguf(path: str | Path) -> tuple[ModelSpec, GGUFSource, GGUFVocab]:
    """The spec, the tensors (lazily dequantized) and the tokenizer's vocabulary of a GGUF
    file; build the tokenizer with :meth:`~tidal.inference_worker.tokenizer.Tokenizer.
    from_gguf`."""
    path = Path(path)
    reader = read_gguf(path)
    origin = str(path)
    spec = spec_from_gguf(reader, origin)
    return spec, GGUFSource(path, reader, spec), vocab_from_gguf(reader, origin)

"""Hugging Face checkpoints: ``config.json`` to a :class:`ModelSpec`, and the safetensors files
(one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``) as a
:class:`~tidal.inference_worker.weights.source.TensorSource` that reads only the slice a
tensor-parallel rank asks for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tidal.inference_worker.model.spec import ModelSpec, RopeScaling, SpecError

# config.json's ``architectures`` (or, when a bare config was saved, ``model_type``) to ours.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightsError(SpecError):
    """A checkpoint's files cannot be read (missing, corrupt, inconsistent); the message names
    the file and, where one is at fault, the tensor."""


class MissingTensorError(WeightsError, KeyError):
    """The checkpoint has no tensor of that name (a KeyError too, as TensorSource promises)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- config.json


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; WeightsError naming the file when missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise WeightsError(f"{what} {path} does not exist") from error
    except OSError as e:
        raise WeightsError(f"cannot read {what} {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{what} {path} is not a JSON object")
    return data


def spec_from_config(path: str | Path) -> ModelSpec:
    """The spec of the checkpoint whose ``config.json`` is ``path`` (or lies in directory
    ``path``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return spec_from_config_dict(read_json(path, "config file"), origin=str(path))


def _architecture(config: dict[str, Any], origin: str) -> str:
    names = config.get("architectures")
    if isinstance(names, list) and names:
        for name in names:
            if name in HF_ARCHITECTURES:
                return HF_ARCHITECTURES[name]
        raise SpecError(
            f"{origin}: architectures {names!r} are not supported; supported: "
            f"{', '.join(HF_ARCHITECTURES)}"
        )
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise SpecError(
        f"{origin}: neither 'architectures' nor model_type {model_type!r} names a supported "
        f"architecture ({', '.join(HF_ARCHITECTURES)})"
    )


def _field(config: dict[str, Any], name: str, origin: str, kind: type[int] | type[float]) -> Any:
    value = config.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{origin}: field {name!r} is missing or not a number (got {value!r})")
    if kind is int and not (isinstance(value, int) or float(value).is_integer()):
        raise SpecError(f"{origin}: field {name!r} must be an integer (got {value!r})")
    return kind(value)


def _rope(config: dict[str, Any], origin: str) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and llama3 scaling from the top level (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta <= 0:
        raise SpecError(f"{origin}: field 'rope_theta' must be a positive number (got {theta!r})")
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, dict):
        scaling = params
    where = "rope_scaling" if scaling is config.get("rope_scaling") else "rope_parameters"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise SpecError(
            f"{origin}: {where}.rope_type {rope_type!r} is not supported (only 'llama3' scaling)"
        )
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"{origin}: {where} for llama3 lacks or garbles field {e}") from e


def spec_from_config_dict(config: dict[str, Any], origin: str = "config.json") -> ModelSpec:
    """The spec a parsed ``config.json`` describes; ``origin`` names it in errors."""
    architecture = _architecture(config, origin)
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise SpecError(f"{origin}: hidden_act {hidden_act!r} is not supported (only 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if architecture != "qwen2" and config.get(name):
            raise SpecError(f"{origin}: {name}=true is not supported for {architecture}")
    hidden = _field(config, "hidden_size", origin, int)
    heads = _field(config, "num_attention_heads", origin, int)
    kv_heads = (
        _field(config, "num_key_value_heads", origin, int)
        if config.get("num_key_value_heads") is not None
        else heads
    )
    head_dim = (
        _field(config, "head_dim", origin, int)
        if config.get("head_dim") is not None
        else hidden // heads
    )
    max_position = _field(config, "max_position_embeddings", origin, int)
    # Sliding-window attention equals full attention while the context fits in the window, and
    # the model implements only full attention: cap the context at the window.
    window = config.get("sliding_window")
    sliding = architecture == "mistral" or bool(config.get("use_sliding_window"))
    if "sliding_attention" in (config.get("layer_types") or ()):
        sliding = True
    if sliding and isinstance(window, int) and 0 < window < max_position:
        max_position = window
    theta, scaling = _rope(config, origin)
    return ModelSpec(
        architecture=architecture,
        vocab_size=_field(config, "vocab_size", origin, int),
        hidden_size=hidden,
        intermediate_size=_field(config, "intermediate_size", origin, int),
        layers=_field(config, "num_hidden_layers", origin, int),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=_field(config, "rms_norm_eps", origin, float),
        rope_theta=theta,
        max_position=max_position,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "qwen2",
        rope_scaling=scaling,
    )


# ----------------------------------------------------------------------------- safetensors


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint directory, read lazily: ``get`` reads only the
    requested rows/columns from the memory-mapped file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        self._handles: dict[Path, Any] = {}
        self._files: dict[str, Path]
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise WeightsError(f"safetensors index {index} has no valid 'weight_map'")
            self._files = {name: self.directory / file for name, file in weight_map.items()}
            for file in sorted(set(self._files.values())):
                if not file.is_file():
                    raise WeightsError(f"safetensors shard {file} (listed in {index}) is missing")
        elif single.is_file():
            self._files = dict.fromkeys(self._open(single).keys(), single)
        else:
            raise WeightsError(
                f"{self.directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}: "
                "not a Hugging Face safetensors checkpoint"
            )

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except FileNotFoundError as error:
                raise WeightsError(f"safetensors file {file} does not exist") from error
            except Exception as e:  # SafetensorError: a truncated or garbled header
                raise WeightsError(f"safetensors file {file} is corrupt or unreadable: {e}") from e
            self._handles[file] = handle
        return handle

    def names(self) -> set[str]:
        return set(self._files)

    def file_of(self, name: str) -> Path:
        if name not in self._files:
            raise MissingTensorError(f"the checkpoint in {self.directory} has no tensor {name!r}")
        return self._files[name]

    def get(
        self,
        name: str,
        rows: slice | None = None,
        cols: slice | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
    ) -> torch.Tensor:
        """Tensor ``name`` (as ``dtype``; None keeps the file's), only ``rows``/``cols``."""
        file = self.file_of(name)
        handle = self._open(file)
        try:
            part = handle.get_slice(name)
        except Exception as e:
            raise WeightsError(f"safetensors file {file} has no tensor {name!r}: {e}") from e
        try:
            ndim = len(part.get_shape())
            full = slice(None)
            if ndim >= 2 and cols is not None:
                tensor = part[rows or full, cols]
            elif ndim >= 1 and rows is not None:
                tensor = part[rows]
            elif cols is not None:
                raise WeightsError(f"tensor {name!r} in {file} is 1-D: it has no columns to slice")
            else:
                tensor = part[:]
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"cannot read tensor {name!r} from {file}: {e}") from e
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"tensor {name!r} in {file} did not read as a torch tensor")
        return tensor if dtype is None else tensor.to(dtype)

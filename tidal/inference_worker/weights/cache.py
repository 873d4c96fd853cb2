"""A converted copy of each GGUF file, so that only the first start-up pays for dequantizing.

The first load of a GGUF file dequantizes every tensor (undoing llama.cpp's Q/K permutation) and
writes the result as a Hugging Face-style directory::

    $TIDAL_CACHE_DIR/<stem>-<key>/
        model-00001-of-0000N.safetensors ...   the tensors, Hugging Face names
        model.safetensors.index.json
        tokenizer.json, tokenizer_config.json, generation_config.json
        spec.json                               the ModelSpec, the key, the format version

Later loads memory-map it (:class:`SafetensorsSource`: a rank reads only its slice). The key is
the GGUF file's size, mtime and the SHA-256 of its first 16 MiB (the header: metadata and
tensor index), so a replaced file is converted again.

Tensors are stored as float32 by default. Dequantized values (``d * q + m`` with fp16 scales)
are not exactly representable in fp16/bf16, so only float32 makes a cached start-up
bit-identical to a first one (same logits, whichever load a test or a replica took); the cost is
disk (about 540 MB for SmolLM2-135M, 4 bytes a parameter), not start-up time: the files are
memory-mapped and read lazily. ``dtype=torch.bfloat16`` (or float16) halves the disk and is
fine where the model runs in that dtype anyway; the dtype is part of the cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tidal.inference_worker.model.spec import ModelSpec, RopeScaling
from tidal.inference_worker.tokenizer import Tokenizer
from tidal.inference_worker.weights.gguf import load_gguf
from tidal.inference_worker.weights.hf import (
    INDEX_FILE,
    SafetensorsSource,
    WeightsError,
    read_json,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
HEAD_BYTES = 16 << 20
SHARD_BYTES = 1 << 30  # write (and hold in memory) at most about this much at a time
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    """``$TIDAL_CACHE_DIR``, else ``~/.cache/tidal/models``."""
    configured = os.environ.get("TIDAL_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tidal" / "models"


def cache_key(path: Path, dtype: torch.dtype = torch.float32) -> str:
    """Size, mtime and the SHA-256 of the header of GGUF file ``path``, and the stored dtype."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(HEAD_BYTES))
    name = _dtype_name(dtype)
    text = f"v{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}:{name}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _dtype_name(dtype: torch.dtype) -> str:
    for name, known in _DTYPES.items():
        if known == dtype:
            return name
    raise WeightsError(f"the converted cache stores float32, float16 or bfloat16, not {dtype}")


def cache_dir_for(path: Path, dtype: torch.dtype = torch.float32, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{path.stem}-{cache_key(path, dtype)}"


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    fields = dict(data)
    scaling = fields.pop("rope_scaling", None)
    return ModelSpec(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


def _read_cached(directory: Path, key: str) -> tuple[ModelSpec, SafetensorsSource, Tokenizer]:
    meta = read_json(directory / SPEC_FILE, "cached spec")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("key") != key:
        raise WeightsError(f"cached conversion {directory} is stale")
    spec = spec_from_json(meta["spec"])
    source = SafetensorsSource(directory)
    if source.names() != set(meta.get("tensors", [])):
        raise WeightsError(f"cached conversion {directory} lacks tensors")
    return spec, source, Tokenizer.from_hf_dir(directory)


def _convert(gguf_path: Path, target: Path, key: str, dtype: torch.dtype) -> None:
    """Dequantize ``gguf_path`` into ``target`` (a fresh directory), shard by shard."""
    spec, source, vocab = load_gguf(gguf_path)
    tokenizer = Tokenizer.from_gguf(vocab)
    names = sorted(source.names())
    shards: list[list[str]] = [[]]
    size = 0
    element = torch.empty((), dtype=dtype).element_size()
    for name in names:
        count = math.prod(source.shape(name))
        if shards[-1] and size + count * element > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += count * element
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: source.full(name).to(dtype).contiguous() for name in shard}
        save_file(tensors, str(target / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, file))
        source.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    tokenizer.save(target)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": str(gguf_path),
        "dtype": _dtype_name(dtype),
        "spec": spec_to_json(spec),
        "tensors": names,
    }
    # spec.json last: a directory without it is not a cache entry.
    (target / SPEC_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_cached_gguf(
    gguf_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    root: Path | None = None,
) -> tuple[ModelSpec, SafetensorsSource, Tokenizer, bool]:
    """The spec, tensors and tokenizer of GGUF file ``gguf_path`` from its converted copy,
    converting it first when there is none (or a stale one); the last value says whether the
    cache already held it. Raises OSError when the cache root cannot be written."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise WeightsError(f"GGUF file {gguf_path} does not exist")
    root = root or cache_root()
    key = cache_key(gguf_path, dtype)
    directory = root / f"{gguf_path.stem}-{key}"
    if (directory / SPEC_FILE).is_file():
        try:
            return (*_read_cached(directory, key), True)
        except (WeightsError, KeyError, TypeError, ValueError) as e:
            log.warning("discarding the converted cache %s: %s", directory, e)
            shutil.rmtree(directory, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    # Convert into a private directory, then rename: concurrent workers (the ranks of one
    # node) never see a half-written entry; the loser of the rename uses the winner's.
    scratch = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}-", dir=root))
    try:
        _convert(gguf_path, scratch, key, dtype)
        try:
            scratch.rename(directory)
        except OSError:
            if not (directory / SPEC_FILE).is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return (*_read_cached(directory, key), False)

"""Build a rank's engine pieces from the worker's options: load its shard of the model, size
the paged KV cache from a memory budget, and (rank 0) the engine around them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tidal.inference_worker.engine.engine import EngineConfig, LLMEngine
from tidal.inference_worker.engine.runner import ModelRunner, PagedKV
from tidal.inference_worker.metrics import WorkerMetrics
from tidal.inference_worker.model.llama import LlamaModel
from tidal.inference_worker.weights.resolve import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_CPU_KV_BYTES = 1 * GiB  # vLLM's VLLM_CPU_KVCACHE_SPACE is a byte budget too
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85


@dataclass(frozen=True)
class EngineOptions:
    """Everything a rank needs to build its part (picklable: ranks are spawned)."""

    model_uri: str
    dtype: str = "float32"
    attention: str = "sdpa"
    tensor_parallel: int = 1
    max_model_len: int | None = None  # None: the model's context length
    kv_cache_bytes: int | None = None  # None: the CPU default, or a share of free GPU memory
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    prefix_cache: bool = True
    iso: bool = True
    iso_min_tokens: int = 256


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype")
    return dtype


def max_model_len(options: EngineOptions, checkpoint: Checkpoint) -> int:
    context = checkpoint.spec.max_position
    if options.max_model_len is None:
        return context
    if options.max_model_len > context:
        raise ValueError(
            f"max_model_len {options.max_model_len} exceeds the model's context length {context}"
        )
    return options.max_model_len


def kv_budget(options: EngineOptions, device: torch.device) -> int:
    if options.kv_cache_bytes is not None:
        return options.kv_cache_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(total * DEFAULT_GPU_MEMORY_UTILIZATION) - used)
    return DEFAULT_CPU_KV_BYTES


def build_runner(
    options: EngineOptions, comm: Any, device: torch.device | str
) -> tuple[ModelRunner, Checkpoint, EngineConfig]:
    """This rank's model shard and cache; every rank computes the same block count from the
    same budget, so block ids mean the same thing everywhere."""
    checkpoint = load_checkpoint(options.model_uri)
    spec = checkpoint.spec
    dtype = torch_dtype(options.dtype)
    model = LlamaModel(spec, checkpoint.source, comm, dtype, device, options.attention)
    length = max_model_len(options, checkpoint)
    per_block = PagedKV.bytes_per_block(
        spec.layers, options.block_size, spec.kv_heads // comm.world, spec.head_dim, dtype
    )
    budget = kv_budget(options, model.placement.device)
    num_blocks = min(budget // per_block, 1 << 20)
    config = EngineConfig(
        length, num_blocks, options.block_size, options.max_num_seqs,
        max(options.max_batched_tokens, 1), options.prefix_cache, options.iso_min_tokens,
    )  # fmt: skip
    runner = ModelRunner(model, num_blocks, options.block_size, length)
    size_gib = num_blocks * per_block / GiB
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB on rank %d), max_model_len %d",
             num_blocks, options.block_size, size_gib, comm.rank, length)  # fmt: skip
    return runner, checkpoint, config


def build_engine(
    options: EngineOptions, comm: Any, device: torch.device | str, metrics: WorkerMetrics | None
) -> LLMEngine:
    """Rank 0's engine (the other ranks build a runner and :func:`engine.follow`)."""
    runner, checkpoint, config = build_runner(options, comm, device)
    costs = None
    if options.iso and comm.world > 1:
        from tidal.inference_worker.iso import measure_costs  # noqa: PLC0415

        costs = measure_costs(runner.model)
    return LLMEngine(runner, checkpoint.tokenizer, config, metrics, costs)

"""Shared fixtures: realistic node shapes and helpers to build snapshots tersely."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tidal.placement import ClusterSnapshot, NodeInfo, PdbInfo, PodInfo
from tidal.topology import NodeShape, compile_shape, load_preset, mask_of, parse_topology

TWO_QUADS = """
name: two-quads
description: 8 GPUs in two 4-GPU NVLink cliques (NV2 inside each), one socket per clique
gpu: {model: test-gpu, memory_mib: 1000}
sockets:
  - id: 0
    numa_nodes:
      - id: 0
        cpu_cores: 32
        host_bridges: [{id: 0, switches: [{id: 0, gpus: [0, 1, 2, 3]}]}]
  - id: 1
    numa_nodes:
      - id: 1
        cpu_cores: 32
        host_bridges: [{id: 1, switches: [{id: 1, gpus: [4, 5, 6, 7]}]}]
nvlink:
  links: [[0, 1, 2], [0, 2, 2], [0, 3, 2], [1, 2, 2], [1, 3, 2], [2, 3, 2],
          [4, 5, 2], [4, 6, 2], [4, 7, 2], [5, 6, 2], [5, 7, 2], [6, 7, 2]]
"""


def shape(name: str) -> NodeShape:
    if name == "two-quads":
        return _two_quads()
    return _compiled(name)


_cache: dict[str, NodeShape] = {}


def _compiled(name: str) -> NodeShape:
    if name not in _cache:
        _cache[name] = compile_shape(load_preset(name))
    return _cache[name]


def _two_quads() -> NodeShape:
    if "two-quads" not in _cache:
        _cache["two-quads"] = compile_shape(parse_topology(TWO_QUADS, "two-quads"))
    return _cache["two-quads"]


def node(
    name: str, preset: str, cpu: int = 96_000, memory: int = 1_000_000, domain: str | None = None
) -> NodeInfo:
    return NodeInfo(name, shape(preset), cpu, memory, nvlink_domain=domain)


def pod(
    uid: str,
    node_name: str,
    gpus: Iterable[int],
    priority: int = 0,
    start: float = 0.0,
    **extra: Any,
) -> PodInfo:
    return PodInfo(
        uid=uid,
        name=uid,
        node=node_name,
        gpus=mask_of(gpus),
        priority=priority,
        start_time=start,
        **extra,
    )


def snapshot(
    nodes: Iterable[NodeInfo],
    pods: Iterable[PodInfo] = (),
    pdbs: Iterable[PdbInfo] = (),
    now: float = 1000.0,
) -> ClusterSnapshot:
    return ClusterSnapshot(nodes, pods, pdbs, now=now)


@pytest.fixture
def two_quads() -> NodeShape:
    return _two_quads()


# -- the bundled SmolLM2 GGUF, and transformers' load of it (the worker's test oracle) -------


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tidal.inference_worker.weights.hf import WeightsError  # noqa: PLC0415
    from tidal.inference_worker.weights.resolve import smollm2_gguf  # noqa: PLC0415

    try:
        return smollm2_gguf()
    except WeightsError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def checkpoint(smollm2_path: Path) -> Any:
    """tidal's own load of the bundled SmolLM2 (the converted cache makes it fast)."""
    from tidal.inference_worker.weights.resolve import load_checkpoint  # noqa: PLC0415

    return load_checkpoint(str(smollm2_path))


@pytest.fixture(scope="session")
def model(checkpoint: Any) -> Any:
    """tidal's decoder over SmolLM2, one rank (the tests' one-sequence reference)."""
    from tidal.inference_worker.model.llama import LlamaModel  # noqa: PLC0415
    from tidal.inference_worker.parallel.comm import LocalComm  # noqa: PLC0415

    return LlamaModel(checkpoint.spec, checkpoint.source, LocalComm())


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_path: Path) -> Any:
    """transformers' model from the GGUF file (about 20 s on 2 cores, once per session)."""
    import time  # noqa: PLC0415

    import transformers  # noqa: PLC0415

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )
    print(f"\ntransformers GGUF model load: {time.perf_counter() - start:.1f} s")
    model.eval()  # type: ignore[no-untyped-call]
    return model

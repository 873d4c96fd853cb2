"""Run a scenario: load the traces, build the cluster and the workload once, replay every
policy on the same event stream."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from tidal.placement import NodeInfo, make_policy
from tidal.simulator.data import (
    DEFAULT_DATA_DIR,
    DataError,
    hourly_load_shape,
    openb_batch_pods,
    openb_nodes,
)
from tidal.simulator.engine import Replay
from tidal.simulator.scenario import Scenario
from tidal.simulator.workload import TraceWorkload, build_workload
from tidal.topology import preset_shape

OPENB = "openb-2023"
QPS = "genai-qps-2026/qps.csv"


@dataclass(frozen=True)
class Inputs:
    nodes: list[NodeInfo]
    workload: TraceWorkload


def data_dir(scenario: Scenario) -> Path:
    path = scenario.data_dir or Path(os.environ.get("TIDAL_DATA_DIR", DEFAULT_DATA_DIR))
    if not path.is_dir():
        raise DataError(
            f"{path}: trace folder not found (set the scenario's data_dir or TIDAL_DATA_DIR to "
            "the folder that holds openb-2023/ and genai-qps-2026/)"
        )
    return path


def prepare(scenario: Scenario) -> Inputs:
    root = data_dir(scenario)
    nodes = cluster_nodes(scenario, root)
    total = sum(n.shape.gpu_count for n in nodes)
    workload = build_workload(
        scenario,
        openb_batch_pods(root / OPENB / "openb_pod_list_default.csv"),
        hourly_load_shape(root / QPS),
        total,
        max(n.shape.gpu_count for n in nodes),
    )
    return Inputs(nodes, workload)


def cluster_nodes(scenario: Scenario, root: Path) -> list[NodeInfo]:
    if scenario.cluster == "synthetic":
        return [
            NodeInfo(f"{preset}-{i:04d}", preset_shape(preset), 128_000, 1_000_000)
            for preset, count in scenario.synthetic_nodes.items()
            for i in range(count)
        ]
    trace = openb_nodes(root / OPENB / "openb_node_list_gpu_node.csv")
    if scenario.max_nodes is not None and scenario.max_nodes < len(trace):
        step = len(trace) / scenario.max_nodes  # an even sample keeps the model mix
        trace = [trace[int(i * step)] for i in range(scenario.max_nodes)]
    return [NodeInfo(n.name, preset_shape(n.preset), n.cpu_milli, n.memory_mib) for n in trace]


Progress = Callable[[str, float], None]


def simulate(
    scenario: Scenario, on_progress: Progress | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Replay every policy of ``scenario`` on the same workload; policies run in parallel
    processes (``workers``, default one per core), each building the same inputs from the
    seed. ``on_progress(policy, simulated_seconds)`` is called in this process."""
    inputs = prepare(scenario)
    workers = min(len(scenario.policies), workers or os.cpu_count() or 1)
    if workers <= 1:
        results = [replay_policy(scenario, name, on_progress, inputs) for name in scenario.policies]
    else:
        results = _in_processes(scenario, workers, on_progress)
    return {
        "scenario": scenario.name,
        "nodes": len(inputs.nodes),
        "gpus": inputs.workload.total_gpus,
        "batch_jobs": len(inputs.workload.jobs),
        "policies": results,
    }


def replay_policy(
    scenario: Scenario, name: str, on_progress: Progress | None = None, inputs: Inputs | None = None
) -> dict[str, Any]:
    inputs = inputs or prepare(scenario)

    def progress(now: float) -> None:
        if on_progress:
            on_progress(name, now)

    # An unbounded planner: a time bound would make plans depend on the machine's load.
    policy = make_policy(name, scenario.baseline_scoring, deadline_s=math.inf)
    metrics = Replay(scenario, inputs.nodes, inputs.workload, policy, progress).run()
    return {"summary": metrics.summary(), "series": metrics.series}


def _in_processes(
    scenario: Scenario, workers: int, on_progress: Progress | None
) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue = manager.Queue()
        futures = [
            pool.submit(replay_policy, scenario, name, _QueueProgress(queue))
            for name in scenario.policies
        ]
        while not all(f.done() for f in futures):
            _drain(queue, on_progress, timeout=0.2)
        _drain(queue, on_progress, timeout=0)
        return [f.result() for f in futures]


class _QueueProgress:
    """A picklable progress callback that forwards to the parent through a queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, policy: str, now: float) -> None:
        self.queue.put((policy, now))


def _drain(queue: Any, on_progress: Progress | None, timeout: float) -> None:
    try:
        item = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        while True:
            if on_progress:
                on_progress(*item)
            item = queue.get_nowait()
    except Empty:
        return

"""Run a scenario: load the traces, build the cluster and the workload once, replay every
policy on the same event stream."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from tidal.simulator.workload import Workload, build_workload
from tidal.topology import preset_shape

OPENB = "openb-2023"
QPS = "genai-qps-2026/qps.csv"


@dataclass(frozen=True)
class Inputs:
    nodes: list[NodeInfo]
    workload: Workload


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


def simulate(
    scenario: Scenario, on_progress: Callable[[str, float], None] | None = None
) -> dict[str, Any]:
    inputs = prepare(scenario)
    results = []
    for name in scenario.policies:

        def progress(now: float, policy: str = name) -> None:
            if on_progress:
                on_progress(policy, now)

        replay = Replay(
            scenario,
            inputs.nodes,
            inputs.workload,
            make_policy(name, scenario.baseline_scoring, math.inf),
            progress,
        )
        metrics = replay.run()
        results.append({"summary": metrics.summary(), "series": metrics.series})
    return {
        "scenario": scenario.name,
        "nodes": len(inputs.nodes),
        "gpus": inputs.workload.total_gpus,
        "batch_jobs": len(inputs.workload.jobs),
        "policies": results,
    }

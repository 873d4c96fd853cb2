"""Run a scenario: load the traces, build the cluster and the workload once, replay every
policy on the same event stream."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from tidal.api import LABEL_GPU_MODEL
from tidal.placement import NodeInfo, make_policy
from tidal.simulator.cluster_model import PresetTable
from tidal.simulator.data import DEFAULT_DATA_DIR, DataError
from tidal.simulator.engine import Replay
from tidal.simulator.report import LoadReport, job_groups, node_groups
from tidal.simulator.scenario import Scenario, TraceSource
from tidal.simulator.traces import (
    SourceReport,
    TraceJob,
    TraceNode,
    read_jobs,
    read_load,
    read_nodes,
)
from tidal.simulator.workload import (
    TraceWorkload,
    build_workload,
    fit_to_cluster,
    in_window,
    split_classes,
)
from tidal.topology import preset_shape

OPENB = "openb-2023"
OPENB_NODES = f"{OPENB}/openb_node_list_gpu_node.csv"
OPENB_PODS = f"{OPENB}/openb_pod_list_default.csv"
QPS = "genai-qps-2026/qps.csv"


@dataclass(frozen=True)
class Inputs:
    nodes: list[NodeInfo]
    workload: TraceWorkload
    report: LoadReport


def data_dir(scenario: Scenario) -> Path:
    path = scenario.data_dir or Path(os.environ.get("TIDAL_DATA_DIR", DEFAULT_DATA_DIR))
    if not path.is_dir():
        raise DataError(
            f"{path}: trace folder not found (set the scenario's data_dir or TIDAL_DATA_DIR to "
            "the folder that holds openb-2023/ and genai-qps-2026/, or name your own files in "
            "the scenario's nodes, jobs and load)"
        )
    return path


@dataclass(frozen=True)
class Sources:
    """The files a scenario reads: its own, or the bundled traces under the data folder."""

    nodes: TraceSource | None  # None: a synthetic cluster
    jobs: TraceSource
    load: TraceSource | None  # None: online work is the trace's own (online: trace)


def sources(scenario: Scenario) -> Sources:
    def bundled(name: str, fmt: str) -> TraceSource:
        return TraceSource(path=str(data_dir(scenario) / name), format=fmt)

    nodes = scenario.nodes
    if scenario.cluster == "openb":
        nodes = bundled(OPENB_NODES, "openb")
    load = None if scenario.online == "trace" else scenario.load or bundled(QPS, "genai-qps")
    return Sources(nodes, scenario.jobs or bundled(OPENB_PODS, "openb"), load)


def prepare(scenario: Scenario) -> Inputs:
    """The cluster, the workload and the report of what was loaded."""
    files = sources(scenario)
    reports: list[SourceReport] = []
    nodes, trace_nodes = cluster_nodes(scenario, files.nodes, reports)
    arrivals = "trace" if scenario.jobs is not None and scenario.jobs.arrivals == "trace" else ""
    jobs, job_report = read_jobs(files.jobs, need_submit=arrivals == "trace")
    reports.append(job_report)
    shape = [1.0] * 24
    if files.load is not None:
        shape, load_report = read_load(files.load)
        reports.append(load_report)
    batch, online = _replayed(scenario, jobs, nodes, job_report)
    total = sum(n.shape.gpu_count for n in nodes)
    try:
        workload = build_workload(scenario, batch, shape, total, online)
    except ValueError as err:
        raise DataError(f"{files.jobs.path}: {err} ({_summary(job_report)})") from err
    report = LoadReport(
        tuple(reports),
        node_groups(nodes, trace_nodes),
        job_groups(jobs, [*batch, *online]),
        tuple(_replay_lines(scenario, nodes, trace_nodes, batch, workload)),
    )
    return Inputs(nodes, workload, report)


def _replayed(
    scenario: Scenario, jobs: list[TraceJob], nodes: list[NodeInfo], report: SourceReport
) -> tuple[list[TraceJob], list[TraceJob]]:
    """(batch, online) jobs the replay uses: by class, that some node holds, in the window."""
    batch, online = split_classes(scenario, jobs, report)
    usable = in_window(scenario, fit_to_cluster([*batch, *online], nodes, report), report)
    return [j for j in usable if j.job_class == "batch"], [
        j for j in usable if j.job_class == "online"
    ]


def cluster_nodes(
    scenario: Scenario, source: TraceSource | None, reports: list[SourceReport]
) -> tuple[list[NodeInfo], dict[str, TraceNode] | None]:
    """The replay's nodes (and, for a node list, each node as the list gave it)."""
    if source is None:
        synthetic = [
            NodeInfo(f"{preset}-{i:04d}", preset_shape(preset), 128_000, 1_000_000)
            for preset, count in scenario.synthetic_nodes.items()
            for i in range(count)
        ]
        return synthetic, None
    trace, report = read_nodes(source, PresetTable.parse(scenario.presets))
    reports.append(report)
    if scenario.max_nodes is not None and scenario.max_nodes < len(trace):
        step = len(trace) / scenario.max_nodes  # an even sample keeps the model mix
        trace = [trace[int(i * step)] for i in range(scenario.max_nodes)]
    nodes = [
        NodeInfo(
            n.name,
            preset_shape(n.preset),
            n.cpu_milli,
            n.memory_mib,
            labels={LABEL_GPU_MODEL: n.gpu_model},
        )
        for n in trace
    ]
    return nodes, {n.name: n for n in trace}


def _replay_lines(
    scenario: Scenario,
    nodes: Sequence[NodeInfo],
    trace_nodes: dict[str, TraceNode] | None,
    batch: Sequence[TraceJob],
    workload: TraceWorkload,
) -> list[str]:
    gpus = sum(n.shape.gpu_count for n in nodes)
    hours = f"{scenario.hours:g} h"
    lines = [f"cluster: {len(nodes):,} nodes, {gpus:,} GPUs"]
    if trace_nodes is not None and scenario.max_nodes is not None:
        lines[0] += " (max_nodes: an even sample of the node list)"
    if scenario.jobs is not None and scenario.jobs.arrivals == "trace":
        lines.append(
            f"batch: {len(workload.jobs):,} jobs at their submission times over {hours} "
            "(arrivals: trace)"
        )
    else:
        lines.append(
            f"batch: {len(workload.jobs):,} jobs over {hours}, drawn with replacement from "
            f"{len(batch):,} trace jobs: a backlog at t=0, then Poisson arrivals offering "
            f"batch_load {scenario.batch_load:g} of the GPUs (durations capped at "
            f"max_batch_hours {scenario.max_batch_hours:g})"
        )
    if scenario.online == "trace":
        lines.append(
            f"online: {len(workload.online_jobs):,} trace online jobs at their submission "
            "times, each worker a replica (online: trace; services and load are not used)"
        )
    else:
        mix = ", ".join(
            f"{s.name} TP{s.tensor_parallel} {s.share:.0%} {s.mode.value}/{s.tier.label}"
            for s in scenario.services
        )
        lines.append(
            f"online: services ({mix}) scaled by the hourly load shape to online_peak "
            f"{scenario.online_peak:g} of the GPUs at the peak hour"
        )
    lines.append(f"policies: {', '.join(scenario.policies)}")
    return lines


def _summary(report: SourceReport) -> str:
    reasons = "; ".join(f"{reason}: {n}" for reason, n in report.drops.most_common())
    return f"{report.rows} rows read" + (f", dropped: {reasons}" if reasons else "")


Progress = Callable[[str, float], None]


def simulate(
    scenario: Scenario,
    on_progress: Progress | None = None,
    workers: int | None = None,
    inputs: Inputs | None = None,
) -> dict[str, Any]:
    """Replay every policy of ``scenario`` on the same workload; policies run in parallel
    processes (``workers``, default one per core), each building the same inputs from the
    seed. ``on_progress(policy, simulated_seconds)`` is called in this process. ``inputs``:
    what :func:`prepare` returned for ``scenario``, when the caller already has it."""
    inputs = inputs or prepare(scenario)
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
        "trace": inputs.report.as_dict(),
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

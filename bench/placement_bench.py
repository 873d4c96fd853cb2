"""Planner and filter latency against cluster size, every policy side by side in one run.

    python bench/placement_bench.py [--sizes 64,500,2000,5000] [--reps 40] [--out bench/results]

Clusters of 8-GPU nodes (DGX H100, HGX A100, DGX-1V cube-mesh, PCIe L40S in equal parts) are
filled to a realistic occupancy: about a quarter of the GPUs run online replicas (priority 1000,
not preemptible), about half run batch pods of 1, 2 or 4 GPUs (priority 10) with random start
times and checkpoints, and at most two GPUs per node are free, so the measured request fits
nowhere. The measured request is an online 4-GPU replica, guaranteed NVLink, so filter
rejects every node and every policy must plan a preemption over the whole cluster.

Filter and planning run on one core (the process is single-threaded). Peak memory is Python
heap (tracemalloc) for building the snapshot plus one plan.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tidal.placement import (
    ClusterSnapshot,
    NodeInfo,
    PodInfo,
    PodRequest,
    Policy,
    SubsetEnumeration,
    TopologyFirstPlanner,
    TopologyMode,
    filter_nodes,
    make_policy,
)
from tidal.topology import NodeShape, Tier, compile_shape, load_preset, mask_of

PRESETS = ("dgx-h100", "hgx-a100", "dgx1-v100", "pcie-8x-l40s")
ONLINE, BATCH = 1000, 10


def build_cluster(nodes: int, seed: int, pods_per_node: int | None = None) -> ClusterSnapshot:
    rng = random.Random(seed)
    shapes = {p: compile_shape(load_preset(p)) for p in PRESETS}
    infos = [
        NodeInfo(f"node-{i:05d}", shapes[PRESETS[i % len(PRESETS)]], 192_000, 1_500_000)
        for i in range(nodes)
    ]
    pods: list[PodInfo] = []
    for info in infos:
        pods.extend(_fill_node(rng, info, pods_per_node))
    return ClusterSnapshot(infos, pods, now=100_000.0)


def _fill_node(rng: random.Random, info: NodeInfo, pods_per_node: int | None) -> list[PodInfo]:
    gpus = list(range(info.shape.gpu_count))
    rng.shuffle(gpus)
    if pods_per_node is not None:  # full nodes of equal batch pods: the B2 growth experiment
        return [
            _pod(info, f"{info.name}-batch{k}", gpus[k::pods_per_node], BATCH, True, rng)
            for k in range(pods_per_node)
        ]
    online = rng.choice([0, 1, 2, 2, 4])
    out = []
    if online:
        out.append(_pod(info, f"{info.name}-online", gpus[:online], ONLINE, False, rng))
    cursor = online
    for k in range(6):
        size = rng.choice([1, 1, 2, 4])
        if cursor + size > len(gpus) - 1:
            break
        batch = gpus[cursor : cursor + size]
        out.append(_pod(info, f"{info.name}-batch{k}", batch, BATCH, True, rng))
        cursor += size
    # Top up with one-GPU batch pods until at most two GPUs are free: the measured 4-GPU
    # request then fits nowhere and every plan is a real preemption.
    free_left = rng.choice([0, 1, 1, 2, 2])
    while cursor < len(gpus) - free_left:
        out.append(_pod(info, f"{info.name}-fill{cursor}", [gpus[cursor]], BATCH, True, rng))
        cursor += 1
    return out


def _pod(
    info: NodeInfo, uid: str, gpus: list[int], priority: int, preemptible: bool, rng: random.Random
) -> PodInfo:
    start = rng.uniform(0, 99_000)
    return PodInfo(
        uid=uid,
        name=uid,
        node=info.name,
        gpus=mask_of(gpus),
        priority=priority,
        cpu_milli=8_000 * len(gpus),
        memory_mib=64_000 * len(gpus),
        preemptible=preemptible,
        workload=uid.rsplit("-", 1)[0],
        start_time=start,
        last_checkpoint=rng.choice([None, start + rng.uniform(0, 100_000 - start)]),
    )


def request(i: int) -> PodRequest:
    return PodRequest(
        f"svc-{i}", f"svc-{i}", 4, ONLINE, 16_000, 128_000, TopologyMode.GUARANTEED, Tier.NVLINK
    )


def timed(fn: Callable[[int], object], reps: int) -> dict[str, float]:
    samples = []
    for i in range(reps):
        started = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))],
        "reps": reps,
    }


def run_size(nodes: int, reps: int, b2_reps: int) -> dict[str, Any]:
    snapshot = build_cluster(nodes, seed=nodes)
    ours = TopologyFirstPlanner(deadline_s=10.0)  # measure the full search, no cut-off
    row: dict[str, Any] = {
        "nodes": nodes,
        "pods": len(snapshot.pods),
        "gpu_occupancy": sum(s.used.bit_count() for s in snapshot.nodes.values()) / (8 * nodes),
    }
    assert not filter_nodes(snapshot, request(0)).feasible, "the request must need preemption"
    row["filter"] = timed(lambda i: filter_nodes(snapshot, request(i)), reps)
    row["plan:tidal"] = timed(lambda i: ours.plan_preemption(snapshot, request(i)), reps)
    for name in ("b0-default", "b1-anchor"):
        row[f"plan:{name}"] = timed(partial(_preempt, make_policy(name), snapshot), reps)
    b2 = make_policy("b2-subsets")
    row["plan:b2-subsets"] = timed(partial(_preempt, b2, snapshot), b2_reps)
    row["plan:tidal:gc-frozen"] = _frozen(
        lambda i: ours.plan_preemption(snapshot, request(i)), reps
    )
    row["peak_mib"] = _peak_memory(nodes)
    return row


def _frozen(fn: Callable[[int], object], reps: int) -> dict[str, float]:
    """Timed after gc.freeze(): a long-running service freezes its loaded cache so that full
    collections stop walking it (the extender does this after its initial sync)."""
    gc.collect()
    gc.freeze()
    try:
        return timed(fn, reps)
    finally:
        gc.unfreeze()


def _preempt(policy: Policy, snapshot: ClusterSnapshot, i: int) -> object:
    return policy.preempt(snapshot, request(i))


def _peak_memory(nodes: int) -> float:
    tracemalloc.start()
    snapshot = build_cluster(nodes, seed=nodes)
    TopologyFirstPlanner(deadline_s=10.0).plan_preemption(snapshot, request(0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def b2_growth(nodes: int, pods_per_node: list[int], reps: int) -> list[dict[str, Any]]:
    """B2 enumerates victim subsets: its cost grows with pods per node, ours does not."""
    return [_growth_row(nodes, count, reps) for count in pods_per_node]


def _growth_row(nodes: int, count: int, reps: int) -> dict[str, Any]:
    snapshot = build_cluster(nodes, seed=count, pods_per_node=count)
    ours = TopologyFirstPlanner(deadline_s=10.0)
    capped = SubsetEnumeration(max_victims=4)
    uncapped = SubsetEnumeration(max_victims=count, max_candidates=count)
    return {
        "nodes": nodes,
        "pods_per_node": count,
        "tidal": timed(lambda i: ours.plan_preemption(snapshot, request(i)), reps),
        "b2_cap4": timed(lambda i: capped.preempt(snapshot, request(i)), reps),
        "b2_uncapped": timed(lambda i: uncapped.preempt(snapshot, request(i)), reps),
    }


def _shape_warmup() -> None:
    for preset in PRESETS:
        shape: NodeShape = compile_shape(load_preset(preset))
        shape.has_aligned(4, Tier.NVLINK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,500,2000,5000")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--b2-reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    _shape_warmup()
    results = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
        "sizes": [run_size(int(n), args.reps, args.b2_reps) for n in args.sizes.split(",")],
        "b2_growth": b2_growth(64, [2, 4, 8], args.b2_reps),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "placement.json").write_text(json.dumps(results, indent=2))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    lines = [
        "| nodes | pods | GPU occupancy | filter p50/p99 ms | tidal plan p50/p99 ms | "
        "tidal plan, gc frozen | B0 p50/p99 ms | B1 p50/p99 ms | B2 (cap 4) p50/p99 ms | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sizes"]:
        cells = [
            _pq(row[k])
            for k in (
                "filter",
                "plan:tidal",
                "plan:tidal:gc-frozen",
                "plan:b0-default",
                "plan:b1-anchor",
                "plan:b2-subsets",
            )
        ]
        lines.append(
            f"| {row['nodes']} | {row['pods']} | {row['gpu_occupancy']:.0%} | "
            + " | ".join(cells)
            + f" | {row['peak_mib']:.1f} |"
        )
    lines += [
        "",
        "| pods per node (64 nodes) | tidal p50 ms | B2 cap 4 p50 ms | B2 uncapped p50 ms |",
        "|---|---|---|---|",
    ]
    for row in results["b2_growth"]:
        lines.append(
            f"| {row['pods_per_node']} | {row['tidal']['p50_ms']:.2f} | "
            f"{row['b2_cap4']['p50_ms']:.2f} | {row['b2_uncapped']['p50_ms']:.2f} |"
        )
    return "\n".join(lines)


def _pq(stats: dict[str, float]) -> str:
    return f"{stats['p50_ms']:.2f} / {stats['p99_ms']:.2f}"


if __name__ == "__main__":
    main()

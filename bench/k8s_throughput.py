"""Scheduling throughput of the real kube-scheduler on KWOK GPU nodes (tidal.devcluster).

    python bench/k8s_throughput.py [--nodes 500,1000] [--pods-per-node 2] [--runs 1]
        [--out bench/results]

For each cluster size: a fresh control plane (etcd, kube-apiserver, kube-scheduler with the
`tidal-scheduler` profile, KWOK), N fake 8-GPU nodes (DGX H100 and DGX-1V in equal parts), then
M pods of 1, 2 or 4 GPUs created while the scheduler is stopped. The scheduler is started and
the clock runs from the moment it answers /healthz until every pod is bound, so the number is
the scheduler's (with or without the extender), not the Python client's pod creation rate.
Per-attempt latency comes from the scheduler's own histogram
`scheduler_scheduling_attempt_duration_seconds`; per-verb extender latency from the extender's
`tidal_extender_verb_duration_seconds`. With `--modes alone,extender` both run on the same pods
(same seed) one after the other, each on a fresh control plane.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.nodes import gpu_pod, node_names

PRESETS = ["dgx-h100", "dgx1-v100"]
GPU_SIZES = (1, 1, 2, 4)  # mean 2 GPUs: two pods per node fill half of the cluster's GPUs
NAMESPACE = "bench"


def scheduler_metrics(local: LocalCluster) -> dict[str, Any]:
    """The scheduler's Prometheus families, read over its secure port as the admin user."""
    text = scheduler_metrics_text(local)
    return {family.name: family for family in text_string_to_metric_families(text)}


def scheduler_metrics_text(local: LocalCluster) -> str:
    pki = local.workdir / "pki"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    port = json.loads((local.workdir / "state.json").read_text())["ports"]["sched"]
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}/metrics", context=context, timeout=10
    ) as response:
        return str(response.read().decode())


_SCHEDULED = re.compile(
    r'^scheduler_schedule_attempts_total\{[^}]*result="scheduled"[^}]*\} (\S+)$', re.MULTILINE
)


def scheduled_count(local: LocalCluster) -> int:
    """Pods scheduled so far, from the scheduler's counter (a regex: parsing the whole
    exposition every poll would cost the machine CPU the scheduler needs)."""
    return int(sum(float(v) for v in _SCHEDULED.findall(scheduler_metrics_text(local))))


def histogram_quantile(family: Any, quantile: float) -> float:
    """Prometheus-style quantile over the cumulative buckets of all label sets, summed."""
    buckets: dict[float, float] = {}
    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total == 0:
        return float("nan")
    rank = quantile * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / max(count - previous_count, 1e-12)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


def timed(label: str, action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    elapsed = time.monotonic() - started
    print(f"  {label}: {elapsed:.1f} s", flush=True)
    return result, elapsed


def extender_metrics(local: LocalCluster) -> dict[str, Any]:
    port = json.loads((local.workdir / "state.json").read_text())["ports"]["extender"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def verb_quantiles(local: LocalCluster) -> dict[str, float]:
    family = extender_metrics(local)["tidal_extender_verb_duration_seconds"]
    out: dict[str, float] = {}
    for verb in ("filter", "prioritize", "bind"):
        samples = [s for s in family.samples if s.labels.get("verb") == verb]
        only = type(family)(family.name, family.documentation, family.type)
        only.samples = samples
        out[f"{verb}_calls"] = int(sum(s.value for s in samples if s.name.endswith("_count")))
        if not out[f"{verb}_calls"]:
            continue  # e.g. prioritize: kube-scheduler skips it when filter passes one node
        for q in (0.5, 0.99):
            out[f"{verb}_p{int(q * 100)}_ms"] = round(histogram_quantile(only, q) * 1000, 2)
    return out


def run_size(nodes: int, pods_per_node: float, seed: int, extender: bool) -> dict[str, Any]:
    local = LocalCluster(ClusterOptions(controller_manager=False, run_extender=extender))
    try:
        local.start()
        core = client.CoreV1Api(local.api_client(pool_size=32))
        names, node_s = timed(
            f"create {nodes} nodes",
            lambda: local.add_gpu_nodes(node_names(nodes, PRESETS), workers=32),
        )
        local.wait_nodes_ready(names, timeout_s=600)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        local.components["kube-scheduler"].stop()
        rng = random.Random(seed)
        count = int(nodes * pods_per_node)
        sizes = [rng.choice(GPU_SIZES) for _ in range(count)]
        with ThreadPoolExecutor(32) as pool:
            _, pod_s = timed(
                f"create {count} pods (scheduler stopped)",
                lambda: list(
                    pool.map(
                        lambda i: core.create_namespaced_pod(
                            NAMESPACE, gpu_pod(f"p{i:06d}", sizes[i], memory="4Gi")
                        ),
                        range(count),
                    )
                ),
            )
        scheduler = local.components["kube-scheduler"]
        scheduler.start()
        scheduler.wait_healthy(120)
        ready_at = time.monotonic()
        while scheduled_count(local) < count:
            if time.monotonic() - ready_at > 1800:
                raise RuntimeError("pods not bound within 30 min")
            time.sleep(0.5)
        bind_s = time.monotonic() - ready_at
        unbound = [
            p.metadata.name
            for p in core.list_namespaced_pod(NAMESPACE).items
            if not p.spec.node_name
        ]
        if unbound:
            raise RuntimeError(f"{len(unbound)} pods counted scheduled but unbound")
        attempts = scheduler_metrics(local)["scheduler_scheduling_attempt_duration_seconds"]
        row = {
            "mode": "extender" if extender else "alone",
            "nodes": nodes,
            "pods": count,
            "gpus_requested": sum(sizes),
            "seconds_to_bind_all": round(bind_s, 2),
            "pods_per_second": round(count / bind_s, 1),
            "attempt_p50_ms": round(histogram_quantile(attempts, 0.5) * 1000, 2),
            "attempt_p99_ms": round(histogram_quantile(attempts, 0.99) * 1000, 2),
            "node_create_s": round(node_s, 1),
            "pod_create_s": round(pod_s, 1),
        }
        if extender:
            row.update(verb_quantiles(local))
            annotated = sum(
                1
                for p in core.list_namespaced_pod(NAMESPACE).items
                if (p.metadata.annotations or {}).get("tidal.dev/gpus")
            )
            if annotated != count:
                raise RuntimeError(f"only {annotated} of {count} pods carry tidal.dev/gpus")
        print(f"  {row}", flush=True)
        return row
    finally:
        local.stop()


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """Extender over alone, per run and size: the two ran back to back on the same pods."""
    rate = {(r["run"], r["nodes"], r["mode"]): r["pods_per_second"] for r in rows}
    pairs = sorted({(run, nodes) for run, nodes, _ in rate})
    lines = [
        f"| {run} | {nodes} | {rate[run, nodes, 'alone']} | {rate[run, nodes, 'extender']} | "
        f"{rate[run, nodes, 'extender'] / rate[run, nodes, 'alone']:.2f} |"
        for run, nodes in pairs
        if (run, nodes, "alone") in rate and (run, nodes, "extender") in rate
    ]
    if lines:
        print("\n| run | nodes | alone pods/s | extender pods/s | ratio |\n|---|---|---|---|---|")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="500,1000", help="comma-separated cluster sizes")
    parser.add_argument("--pods-per-node", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--modes", default="alone,extender", help="alone (kube-scheduler only), extender, or both"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat every size and mode (the ratio is per run)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rows = []
    modes = args.modes.split(",")
    for run in range(1, args.runs + 1):
        for nodes in [int(n) for n in args.nodes.split(",")]:
            for mode in modes:
                print(f"run {run}: {nodes} nodes, {mode}", flush=True)
                row = run_size(nodes, args.pods_per_node, args.seed, mode == "extender")
                rows.append({"run": run, **row})
    print(
        "\n| nodes | pods | mode | pods/s | s to bind all | attempt p50 / p99 ms | "
        "filter p50 / p99 ms | prioritize p50 / p99 ms | bind p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        verbs = " | ".join(
            f"{r[f'{v}_p50_ms']} / {r[f'{v}_p99_ms']}" if f"{v}_p50_ms" in r else "-"
            for v in ("filter", "prioritize", "bind")
        )
        print(
            f"| {r['nodes']} | {r['pods']} | {r['mode']} | {r['pods_per_second']} | "
            f"{r['seconds_to_bind_all']} | {r['attempt_p50_ms']} / {r['attempt_p99_ms']} | "
            f"{verbs} |"
        )
    print_ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python bench/k8s_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": rows,
    }
    (args.out / "k8s_throughput.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""The extender's filter and prioritize over HTTP at 1,000–5,000 nodes, on their own.

    python bench/extender_http_bench.py [--nodes 1000,5000] [--reps 300] [--out bench/results]

The control-plane benchmark (k8s_throughput.py) measures the verbs while etcd, the apiserver,
kube-scheduler and KWOK share the machine. This one isolates the extender: a server process
(uvicorn, the production app) with a cache of N fake 8-GPU nodes about half full, and a client
process that sends what kube-scheduler sends with `nodeCacheCapable: true` — the pod and all N
node names to /filter, then the passing names to /prioritize — over one keep-alive connection.
Latency is the client's round trip (JSON both ways included) and the server's own histogram.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from tidal.devcluster.nodes import gpu_node
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender

PRESETS = ("dgx-h100", "dgx1-v100")


class NoActions:
    """Filter and prioritize never act on the cluster; anything else here is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the benchmark does not expect {name}")


def bound_pod(name: str, node: str, gpus: list[int]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "bench", "uid": f"uid-{name}",
                     "annotations": {"tidal.dev/gpus": ",".join(map(str, gpus))},
                     "creationTimestamp": "2026-11-23T00:00:00Z"},
        "spec": {"nodeName": node, "priority": 10, "schedulerName": "tidal-scheduler",
                 "containers": [
            {"name": "w", "resources": {"limits": {"nvidia.com/gpu": str(len(gpus))}}}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


def pending_pod(name: str, gpus: int, guaranteed: bool) -> dict[str, Any]:
    pod = bound_pod(name, "", list(range(gpus)))
    pod["spec"].pop("nodeName")
    pod["metadata"]["annotations"] = {"tidal.dev/topology-mode": "guaranteed"} if guaranteed else {}
    pod["status"]["phase"] = "Pending"
    return pod


def pending_pods(count: int) -> list[dict[str, Any]]:
    """The pods the client asks about; the server's cache holds them too (the extender
    plans from its own copy of a pod, never from the request body)."""
    rng = random.Random(2)
    return [
        pending_pod(f"p{i}", rng.choice((1, 2, 4)), guaranteed=rng.random() < 0.5)
        for i in range(count)
    ]


def filled_cache(nodes: int, seed: int) -> tuple[ClusterCache, list[str]]:
    rng = random.Random(seed)
    cache = ClusterCache()
    names = [f"node-{i:05d}" for i in range(nodes)]
    cache.replace("nodes", [gpu_node(n, PRESETS[i % 2]) for i, n in enumerate(names)])
    cache.replace("pdbs", [])
    pods = []
    for name in names:
        free = list(range(8))
        rng.shuffle(free)
        used = 0
        while used < 4:  # about half of every node's GPUs busy, scattered
            size = rng.choice((1, 1, 2))
            pods.append(bound_pod(f"{name}-{used}", name, free[used : used + size]))
            used += size
    cache.replace("pods", pods)
    return cache, names


def serve(nodes: int, port: int, ready: Any, asked: int) -> None:
    import uvicorn  # noqa: PLC0415

    from tidal.scheduler_extender.server import create_app  # noqa: PLC0415

    cache, _ = filled_cache(nodes, seed=1)
    for pod in pending_pods(asked):
        cache.upsert_pod(pod)
    gc.freeze()  # as `tidal extender` does once its cache has synced
    app = create_app(Extender(cache, NoActions()), ready=lambda: True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    ready.set()
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> Any:
    connection.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
    return orjson.loads(data)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(nodes: int, reps: int) -> dict[str, Any]:
    port = free_port()
    ready = multiprocessing.Event()
    asked = pending_pods(reps + 20)  # the first 20 warm the caches
    server = multiprocessing.Process(
        target=serve, args=(nodes, port, ready, len(asked)), daemon=True
    )
    server.start()
    ready.wait(600)
    names = [f"node-{i:05d}" for i in range(nodes)]
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    filter_ms, prioritize_ms, passed = [], [], []
    for i, pod in enumerate(asked):
        start = time.perf_counter()
        result = post(connection, "/filter", {"Pod": pod, "NodeNames": names})
        middle = time.perf_counter()
        post(connection, "/prioritize", {"Pod": pod, "NodeNames": result["NodeNames"]})
        end = time.perf_counter()
        if i >= 20:
            filter_ms.append((middle - start) * 1e3)
            prioritize_ms.append((end - middle) * 1e3)
            passed.append(len(result["NodeNames"] or []))
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    server.terminate()
    server.join(10)
    return {
        "nodes": nodes, "reps": reps, "nodes_passing_median": statistics.median(passed),
        "filter_p50_ms": percentile(filter_ms, 0.5), "filter_p99_ms": percentile(filter_ms, 0.99),
        "prioritize_p50_ms": percentile(prioritize_ms, 0.5),
        "prioritize_p99_ms": percentile(prioritize_ms, 0.99),
        "server_filter_mean_ms": _server_mean(metrics, "filter"),
    }  # fmt: skip


def _server_mean(metrics: str, verb: str) -> float:
    total = count = 0.0
    for line in metrics.splitlines():
        if f'verb="{verb}"' not in line:
            continue
        if line.startswith("tidal_extender_verb_duration_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("tidal_extender_verb_duration_seconds_count"):
            count = float(line.split()[-1])
    return total / count * 1e3 if count else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1000,5000")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        row = measure(nodes, args.reps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| nodes | nodes passing | filter p50 / p99 ms | prioritize p50 / p99 ms | "
          "server filter mean ms |\n|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['nodes']} | {r['nodes_passing_median']:.0f} | {r['filter_p50_ms']:.2f} / "
              f"{r['filter_p99_ms']:.2f} | {r['prioritize_p50_ms']:.2f} / "
              f"{r['prioritize_p99_ms']:.2f} | {r['server_filter_mean_ms']:.2f} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cores": os.cpu_count(),
               "cpu": platform.processor() or platform.machine()}  # fmt: skip
    (args.out / "extender_http.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

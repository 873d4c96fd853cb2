"""What hostile callers cost the extender: huge bodies and idle connections, with tidal's limits
and without them, side by side on one machine.

    python bench/extender_abuse.py [--nodes 1000] [--floods 16] [--flood-mb 13] [--idle 600]

Each configuration runs the production app in a server process of its own (so memory is its
own), with a cache of N 8-GPU nodes:
- "unbounded": no body limit, every body parsed on the event loop, no call limit, uvicorn's
  plain HTTP protocol (what the extender had before it was hardened);
- "tidal": the defaults of `tidal extender` (server.Limits, run.GuardedHttp).
Flood: ``--floods`` parallel clients each POST a ``--flood-mb`` MB /filter body while a
scheduler-like client sends normal filters (the pod and all N node names); reported: the normal
filters' latency during the flood and the server's RSS before, at peak and after.
Idle: the server may hold 512 descriptors (RLIMIT_NOFILE); a client opens ``--idle`` connections
and sends nothing, waits past the head timeout, then makes 10 normal filters: how many succeed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import resource
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.environment import machine
from bench.extender_http_bench import NoActions, filled_cache, pending_pods

CONFIGS = ("unbounded", "tidal")
SERVER_FILES = 512


def serve(config: str, nodes: int, port: int, ready: Any) -> None:
    import uvicorn  # noqa: PLC0415

    from tidal.scheduler_extender.extender import Extender  # noqa: PLC0415
    from tidal.scheduler_extender.run import ServeOptions, verb_config  # noqa: PLC0415
    from tidal.scheduler_extender.server import Limits, create_app  # noqa: PLC0415

    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_FILES, SERVER_FILES))
    cache, _ = filled_cache(nodes, seed=1)
    for pod in pending_pods(50):
        cache.upsert_pod(pod)
    extender = Extender(cache, NoActions())
    if config == "unbounded":
        huge = 2**40
        limits = Limits(max_body_bytes=huge, large_body_bytes=huge, max_concurrent=10**6)
        app = create_app(extender, ready=lambda: True, limits=limits)
        server_config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")
    else:
        app = create_app(extender, ready=lambda: True)
        options = ServeOptions(port=port, log_level="critical")
        server_config = verb_config(options, app)
    ready.set()
    uvicorn.Server(server_config).run()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def normal_filter(port: int, names: list[str], index: int, timeout: float = 30) -> float | None:
    """One filter as kube-scheduler sends it; its latency in ms, None when it failed."""
    pod = pending_pods(50)[index % 50]
    body = orjson.dumps({"Pod": pod, "NodeNames": names})
    start = time.perf_counter()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("POST", "/filter", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        connection.close()
    except OSError:
        return None
    return (time.perf_counter() - start) * 1e3 if response.status == 200 else None


def flood_body(size_mb: int) -> bytes:
    count = size_mb * 2**20 // 14  # each name is 14 bytes of JSON
    names = [f"x-{i:09d}" for i in range(count)]
    return orjson.dumps({"Pod": pending_pods(1)[0], "NodeNames": names})


def flood(port: int, body: bytes, statuses: list[int]) -> None:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        connection.request("POST", "/filter", body, {"Content-Type": "application/json"})
        statuses.append(connection.getresponse().status)
    except OSError:
        statuses.append(0)


def start_server(config: str, nodes: int) -> tuple[multiprocessing.Process, int]:
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(config, nodes, port, ready), daemon=True)
    server.start()
    ready.wait(600)
    deadline = time.monotonic() + 60
    while normal_filter(port, ["node-00000"], 0, timeout=5) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{config} server did not come up")
        time.sleep(0.2)
    return server, port


def measure_flood(config: str, nodes: int, floods: int, size_mb: int) -> dict[str, Any]:
    server, port = start_server(config, nodes)
    assert server.pid is not None
    names = [f"node-{i:05d}" for i in range(nodes)]
    quiet = [normal_filter(port, names, i) for i in range(20)]
    before = rss_mib(server.pid)
    statuses: list[int] = []
    body = flood_body(size_mb)
    attackers = [threading.Thread(target=flood, args=(port, body, statuses)) for _ in range(floods)]
    peak, during = before, []
    for thread in attackers:
        thread.start()
    index = 0
    while any(t.is_alive() for t in attackers):
        during.append(normal_filter(port, names, index))
        peak = max(peak, rss_mib(server.pid))
        index += 1
    for thread in attackers:
        thread.join()
    time.sleep(2)
    after = rss_mib(server.pid)
    server.terminate()
    server.join(10)
    done = [ms for ms in during if ms is not None]
    return {
        "config": config,
        "quiet_filter_p50_ms": statistics.median(ms for ms in quiet if ms is not None),
        "flood_filter_p50_ms": statistics.median(done) if done else None,
        "flood_filter_max_ms": max(done) if done else None,
        "flood_filters": len(during),
        "flood_filters_failed": len(during) - len(done),
        "flood_statuses": sorted(set(statuses)),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(after, 1),
    }


def measure_idle(config: str, nodes: int, idle: int, head_timeout_s: float) -> dict[str, Any]:
    server, port = start_server(config, nodes)
    names = [f"node-{i:05d}" for i in range(nodes)]
    sockets = []
    for _ in range(idle):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            break
    time.sleep(head_timeout_s + 2)
    calls = [normal_filter(port, names, i, timeout=5) for i in range(10)]
    for sock in sockets:
        sock.close()
    server.terminate()
    server.join(10)
    return {
        "config": config,
        "idle_opened": len(sockets),
        "calls_ok": sum(ms is not None for ms in calls),
        "calls": len(calls),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> int:
    from tidal.scheduler_extender.run import HEAD_TIMEOUT_S  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--floods", type=int, default=16)
    parser.add_argument("--flood-mb", type=int, default=13)
    parser.add_argument("--idle", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    floods = [measure_flood(c, args.nodes, args.floods, args.flood_mb) for c in CONFIGS]
    idles = [measure_idle(c, args.nodes, args.idle, HEAD_TIMEOUT_S) for c in CONFIGS]
    for row in (*floods, *idles):
        print(json.dumps(row), flush=True)
    print(f"\n{args.floods} x {args.flood_mb} MB bodies, {args.nodes} nodes:\n")
    print("| config | normal filter p50 quiet / during flood / max ms | failed | flood answers | "
          "RSS before / peak / after MiB |\n|---|---|---|---|---|")  # fmt: skip
    for r in floods:
        latency = f"{r['quiet_filter_p50_ms']:.1f} / {_ms(r['flood_filter_p50_ms'])} / " + _ms(
            r["flood_filter_max_ms"]
        )
        failed = f"{r['flood_filters_failed']} of {r['flood_filters']}"
        rss = f"{r['rss_before_mib']} / {r['rss_peak_mib']} / {r['rss_after_mib']}"
        print(f"| {r['config']} | {latency} | {failed} | {r['flood_statuses']} | {rss} |")
    print(f"\n{args.idle} idle connections against a server with {SERVER_FILES} descriptors:\n")
    print(
        "| config | idle connections opened | normal calls ok after the head timeout |\n"
        "|---|---|---|"
    )
    for r in idles:
        print(f"| {r['config']} | {r['idle_opened']} | {r['calls_ok']} of {r['calls']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = machine()
    (args.out / "extender_abuse.json").write_text(
        json.dumps({"machine": stamp, "flood": floods, "idle": idles}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The extender's web view: the snapshot it builds from its cache (the pool the metrics export,
the reservations, the pending pods with the reasons of tidal_extender_pending_pods), the recent
preemptions it keeps, and /dashboard and /dashboard/snapshot.json on the verbs' listener and
the health listener.

Nodes are DGX-1V: NVLink quads {0-3} and {4-7}.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin

import pytest
from starlette.testclient import TestClient

from tests.test_extender import FakeCluster, filter_args, published, with_health
from tests.test_extender_metrics import STARTED, new_extender, reserved_for, tidal_pod
from tidal.scheduler_extender.extender import Extender
from tidal.scheduler_extender.server import create_app, create_health_app
from tidal.scheduler_extender.webview import build_snapshot
from tidal.scheduler_extender.wire import parse_preempt
from tidal.webview.page import content_security_policy, render_page
from tidal.webview.snapshot import RECENT_PREEMPTIONS, PreemptionRecord, Victim

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def pool() -> tuple[Extender, FakeCluster]:
    """Node n: a batch worker on 0,1, a pod of no tidal class on 2, GPU 3 unhealthy, a replica
    on 4-7. Node m: a preemptor's reservation on 0-3 (its victim still on 0,1), 4-7 free.
    Pending: the preemptor, a pod with a hostile name, a batch pod filter found no plan for."""
    extender, fake, _ = new_extender("m", "n")
    extender.cache.upsert_topology(with_health(published("n", "dgx1-v100"), "0,1,2,4,5,6,7"))
    job, chat = ("llmbatchjob", "job"), ("llmservice", "chat")
    fake.add(tidal_pod("job-0-1", 2, "batch", node="n", held=[0, 1], owner=job, tier="nvlink"))
    fake.add(tidal_pod("misc", 1, None, node="n", held=[2]))
    fake.add(
        tidal_pod("chat-0", 4, "online", node="n", held=[4, 5, 6, 7], owner=chat, tier="nvlink")
    )
    fake.add(tidal_pod("job-1-1", 2, "batch", node="m", held=[0, 1], owner=job))
    preemptor = tidal_pod("chat-1", 4, "online", owner=chat, tier="nvlink", guaranteed=True)
    reserved_for(preemptor, "m", [0, 1, 2, 3], ["uid-job-1-1"])
    fake.add(preemptor)
    fake.add(tidal_pod(HOSTILE, 1, "batch"))
    stuck = fake.add(tidal_pod("stuck", 4, "batch", guaranteed=True))
    assert extender.filter(filter_args(stuck, ["n"]))["NodeNames"] == []
    return extender, fake


def states(snapshot: dict[str, Any]) -> dict[str, list[str]]:
    return {node["name"]: [gpu["state"] for gpu in node["gpus"]] for node in snapshot["nodes"]}


def test_the_snapshot_is_the_pool_the_metrics_export(pool: Any) -> None:
    extender, _ = pool
    snapshot = build_snapshot(extender).to_json()
    assert (snapshot["version"], snapshot["source"], snapshot["time"]) == (
        1,
        "extender",
        STARTED + 3600,
    )
    assert states(snapshot) == {
        "m": ["reserved"] * 4 + ["free"] * 4,
        "n": ["batch", "batch", "online", "unhealthy", *["online"] * 4],
    }
    m, n = snapshot["nodes"]
    # A reserved GPU names its preemptor, even where a victim still runs.
    assert m["gpus"][0] == {
        "gpu": 0,
        "state": "reserved",
        "class": "online",
        "tier": "nvlink",
        "namespace": "ns",
        "pod": "chat-1",
        "workload": "chat",
        "mode": "guaranteed",
    }
    assert (n["gpus"][2]["class"], n["gpus"][2]["pod"], n["gpus"][2]["workload"]) == (
        "other",
        "misc",
        "misc",
    )
    nobody = {"class": "", "tier": "", "namespace": "", "pod": "", "workload": "", "mode": ""}
    assert n["gpus"][3] == {"gpu": 3, "state": "unhealthy", **nobody}
    assert m["gpus"][4] == {"gpu": 4, "state": "free", **nobody}
    assert snapshot["totals"] == {"free": 4, "batch": 2, "online": 5, "reserved": 4, "unhealthy": 1}
    assert snapshot["reservations"] == [
        {"preemptor": "ns/chat-1", "node": "m", "gpus": [0, 1, 2, 3]}
    ]


def test_pending_pods_carry_the_reasons_the_gauge_counts(pool: Any) -> None:
    extender, _ = pool
    pending = build_snapshot(extender).to_json()["pending"]
    # All created at STARTED, an hour ago: by name.
    assert pending == [
        {"pod": f"ns/{HOSTILE}", "reason": "unfiltered", "waiting_s": 3600.0},
        {"pod": "ns/chat-1", "reason": "unfiltered", "waiting_s": 3600.0},
        {"pod": "ns/stuck", "reason": "no-plan", "waiting_s": 3600.0},
    ]
    gauge = {reason: n for reason, n in extender.pending_reasons().items() if n}
    assert Counter(p["reason"] for p in pending) == gauge


def preempt_on(extender: Extender, fake: FakeCluster, node: str, name: str) -> dict[str, Any]:
    """A guaranteed TP4 preemptor through the preempt verb, offered every pod of ``node``."""
    preemptor = fake.add(tidal_pod(name, 4, "online", guaranteed=True))
    on_node = [p for p in fake.pods.values() if p["spec"].get("nodeName") == node]
    proposed = {node: {"Pods": [{"UID": p["metadata"]["uid"]} for p in on_node]}}
    return extender.preempt(parse_preempt({"Pod": preemptor, "NodeNameToMetaVictims": proposed}))


def test_a_preemption_is_kept_with_its_victims_and_cost() -> None:
    """Every GPU of cube-a busy; a 2-GPU batch pod straddles the quads on 3,4, so either quad
    frees 5 GPUs for 4: one wasted. Victims started an hour ago with no checkpoint."""
    extender, fake, clock = new_extender("cube-a")
    fake.add(tidal_pod("wide", 2, "batch", node="cube-a", held=[3, 4]))
    for gpu in (0, 1, 2, 5, 6, 7):
        fake.add(tidal_pod(f"b{gpu}", 1, "batch", node="cube-a", held=[gpu]))
    answer = preempt_on(extender, fake, "cube-a", "tp4")
    chosen = sorted(pod["UID"] for pod in answer["NodeNameToMetaVictims"]["cube-a"]["Pods"])
    (record,) = extender.preemptions
    by_pod = tuple(sorted(record.victims, key=lambda victim: victim.pod))
    assert replace(record, victims=by_pod) == PreemptionRecord(
        time=clock[0],
        preemptor="ns/tp4",
        klass="online",
        tier="nvlink",
        node="cube-a",
        victims=tuple(
            Victim(f"ns/{uid.removeprefix('uid-')}", "batch", 2 if uid == "uid-wide" else 1)
            for uid in chosen
        ),
        victim_gpus=5,
        wasted_gpus=1,
        lost_gpu_seconds=18000.0,  # 5 GPUs x 3600 s since the victims started
    )
    assert build_snapshot(extender).preemptions == (record,)


def test_only_the_latest_preemptions_are_kept_newest_first() -> None:
    nodes = [f"node-{i:02d}" for i in range(RECENT_PREEMPTIONS + 5)]
    extender, fake, _ = new_extender(*nodes)
    for i, node in enumerate(nodes):
        for quad, gpus in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):
            fake.add(tidal_pod(f"batch-{i}-{quad}", 4, "batch", node=node, held=gpus))
        assert preempt_on(extender, fake, node, f"tp-{i:02d}")["NodeNameToMetaVictims"]
    assert len(extender.preemptions) == RECENT_PREEMPTIONS
    listed = [p["preemptor"] for p in build_snapshot(extender).to_json()["preemptions"]]
    assert listed == [f"ns/tp-{i:02d}" for i in reversed(range(5, len(nodes)))]


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(params=["verbs", "health"])
def client(request: pytest.FixtureRequest, pool: Any) -> TestClient:
    extender, _ = pool
    make = create_app if request.param == "verbs" else create_health_app
    test_client = TestClient(make(extender, lambda: True))
    test_client.extender = extender  # type: ignore[attr-defined]
    return test_client


def test_the_page_is_served_read_only_with_its_policy(client: TestClient) -> None:
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == content_security_policy()
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.text == render_page("dashboard/snapshot.json", None)
    assert "<h1>tidal: GPU pool</h1>" in response.text
    assert HOSTILE not in response.text  # the page is static: cluster names come as JSON


def test_the_snapshot_is_served_as_json(client: TestClient) -> None:
    response = client.get("/dashboard/snapshot.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body == json.loads(json.dumps(build_snapshot(client.extender).to_json()))  # type: ignore[attr-defined]
    assert {p["pod"] for p in body["pending"]} >= {f"ns/{HOSTILE}"}  # data, verbatim


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/snapshot.json"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_the_web_view_takes_no_write(client: TestClient, path: str, method: str) -> None:
    assert client.request(method, path).status_code == 405
    assert client.head(path).status_code == 200


@pytest.mark.parametrize(
    "page", ["http://localhost:9401/dashboard", "http://h/api/v1/services/x:9401/proxy/dashboard"]
)
def test_the_page_finds_its_snapshot_beside_it_behind_any_prefix(page: str) -> None:
    assert urljoin(page, "dashboard/snapshot.json") == page + "/snapshot.json"

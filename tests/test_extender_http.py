"""The extender's HTTP surface: status codes, health, metrics, and a fuzz test of every verb."""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.test_extender import FakeCluster, pod
from tidal.devcluster.nodes import gpu_node
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender
from tidal.scheduler_extender.run import JsonFormatter
from tidal.scheduler_extender.server import Limits, create_app

VERBS = ("filter", "prioritize", "preempt", "bind")
LIMITS = Limits(max_body_bytes=64 * 2**10, large_body_bytes=8 * 2**10)


@pytest.fixture(scope="module")
def client() -> TestClient:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("cube-a", "dgx1-v100")])
    fake = FakeCluster(cache)
    fake.add(pod("b0", 2, node="cube-a", held=[0, 1]))
    for name, gpus in (("p", 4), ("f", 1)):
        fake.add(pod(name, gpus, guaranteed=True))
    ready = {"value": False}
    app = create_app(Extender(cache, fake), ready=lambda: ready["value"], limits=LIMITS)
    test_client = TestClient(app)
    test_client.ready = ready  # type: ignore[attr-defined]
    return test_client


def test_filter_roundtrip_over_http(client: TestClient) -> None:
    body = {"Pod": pod("p", 4, guaranteed=True), "NodeNames": ["cube-a"]}
    response = client.post("/filter", content=orjson.dumps(body))
    assert response.status_code == 200
    assert response.json()["NodeNames"] == ["cube-a"]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"Pod": 1}', b"null"])
def test_malformed_bodies_get_400_with_a_reason(client: TestClient, verb: str, body: bytes) -> None:
    response = client.post(f"/{verb}", content=body)
    assert response.status_code == 400
    assert response.json()["Error"].startswith(f"{verb}: bad request")


@pytest.mark.parametrize("verb", VERBS)
def test_an_oversized_body_is_refused_before_it_is_read(client: TestClient, verb: str) -> None:
    huge = orjson.dumps({"Pod": pod("p", 4), "NodeNames": ["cube-a"] * 20_000})
    response = client.post(f"/{verb}", content=huge)
    assert response.status_code == 413
    assert "exceeds 65536" in response.json()["Error"]

    def chunks() -> Any:  # no Content-Length: counted as it streams
        yield huge[: len(huge) // 2]
        yield huge[len(huge) // 2 :]

    assert client.post(f"/{verb}", content=chunks()).status_code == 413


def test_a_large_body_is_parsed_off_the_loop_and_answered(client: TestClient) -> None:
    names = ["cube-a", *(f"absent-{i}" for i in range(2_000))]
    body = orjson.dumps({"Pod": pod("p", 4, guaranteed=True), "NodeNames": names})
    assert LIMITS.large_body_bytes < len(body) < LIMITS.max_body_bytes
    response = client.post("/filter", content=body)
    assert response.status_code == 200
    assert response.json()["NodeNames"] == ["cube-a"]


@pytest.mark.parametrize(
    "pod_body",
    [
        {"metadata": {"name": 1, "uid": "u"}},
        {"metadata": {"name": "p", "uid": ["u"]}},
        {"metadata": {"name": "p", "uid": "u", "namespace": {}}},
    ],
)
def test_wrong_types_in_the_pod_get_400_naming_the_field(
    client: TestClient, pod_body: dict[str, Any]
) -> None:
    response = client.post("/filter", content=orjson.dumps({"Pod": pod_body, "NodeNames": []}))
    assert response.status_code == 400
    assert "Pod.metadata" in response.json()["Error"]


def test_readyz_follows_the_cache_and_metrics_are_exposed(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    client.ready["value"] = False  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 503
    client.ready["value"] = True  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 200
    client.post("/filter", content=orjson.dumps({"Pod": pod("p", 1), "NodeNames": ["cube-a"]}))
    text = client.get("/metrics").text
    assert 'tidal_extender_verb_duration_seconds_count{verb="filter"}' in text
    assert 'tidal_extender_cache_objects{kind="nodes"} 1.0' in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# Envelopes close to the real ones, with random members, so the fuzz reaches past the first check.
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "Pod": st.one_of(json_values, st.just(pod("f", 1))),
        "NodeNames": st.one_of(json_values, st.lists(st.sampled_from(["cube-a", "x"]))),
        "Nodes": json_values,
        "NodeNameToMetaVictims": json_values,
        "PodName": json_values,
        "PodNamespace": json_values,
        "PodUID": json_values,
        "Node": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(verb=st.sampled_from(VERBS), body=st.one_of(json_values, envelopes))
def test_fuzzed_requests_never_crash_the_server(client: TestClient, verb: str, body: Any) -> None:
    # stdlib json: it writes integers beyond 64 bits too, which the server must refuse cleanly
    response = client.post(f"/{verb}", content=json.dumps(body))
    assert response.status_code in (200, 400), response.text
    assert isinstance(response.json(), dict | list)


def test_json_log_lines_are_parseable() -> None:
    record = logging.LogRecord(
        "tidal.x", logging.INFO, __file__, 1, "pod %s: bound", ("a/b",), None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "pod a/b: bound" and entry["level"] == "info"

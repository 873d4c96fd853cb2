"""Hostile and careless input to the extender: forged request bodies, forged or corrupted
annotations and reservations, and a fuzzed event stream. Each test here failed on the extender
before it was hardened (issue "nobody gets in, nothing freezes, nothing is lost").

Invariants: the extender acts only on what the cluster says (never on a request body), no
watched object stops the cache, no GPU is held by two live pods, and every GPU a live pod holds
stays accounted.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_extender import BATCH, ONLINE, FakeCluster, fill_cross_pattern, filter_args, pod
from tidal.api import CONDITION_RESERVATION
from tidal.devcluster.nodes import gpu_node
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender, ExtenderSettings
from tidal.scheduler_extender.translate import (
    ObjectError,
    ReservationRecord,
    parse_gpu_list,
)
from tidal.scheduler_extender.wire import BindArgs, parse_preempt
from tidal.topology import bits

NOW = 1_000_000.0


@pytest.fixture
def cluster() -> tuple[Extender, FakeCluster]:
    cache = ClusterCache(clock=lambda: NOW)
    cache.replace("nodes", [gpu_node("cube-a", "dgx1-v100"), gpu_node("cube-b", "dgx1-v100")])
    cache.replace("pdbs", [])
    fake = FakeCluster(cache)
    return Extender(cache, fake, ExtenderSettings(reservation_ttl_s=60)), fake


def evictions(fake: FakeCluster) -> list[str]:
    return [name for kind, name in fake.calls if kind == "evict"]


def reservation_condition(record: dict[str, Any]) -> dict[str, Any]:
    return {"type": CONDITION_RESERVATION, "status": "True", "message": json.dumps(record)}


# -- 1. the request body is not trusted ------------------------------------------------------


def test_a_forged_filter_body_evicts_nothing(cluster: Any) -> None:
    """The body claims online priority for a pending batch pod: the plan uses the pod's real
    priority, which may evict no batch pod."""
    extender, fake = cluster
    fill_cross_pattern(fake)
    real = fake.add(pod("batch-tp4", 4, priority=BATCH, guaranteed=True))
    forged = copy.deepcopy(real)
    forged["spec"]["priority"] = 2_000_000_000
    result = extender.filter(filter_args(forged, ["cube-a"]))
    assert result["NodeNames"] == []
    assert evictions(fake) == []
    assert extender.cache.snapshot.reservations == {}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["metadata"].update(name="ghost", uid="made-up"), "does not exist"),
        (lambda p: p["metadata"].update(uid="made-up"), "another UID"),
        (lambda p: p["metadata"].update(name="b0", uid="uid-b0"), "already bound"),
        (lambda p: p["metadata"].update(uid="uid-other"), "another UID"),
    ],
)
def test_filter_refuses_pods_it_does_not_know(cluster: Any, change: Any, reason: str) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)
    fake.add(pod("other", 4, priority=ONLINE))
    body = pod("tp4", 4, priority=ONLINE, guaranteed=True)
    fake.add(copy.deepcopy(body))
    change(body)
    result = extender.filter(filter_args(body, ["cube-a"]))
    assert reason in result["Error"]
    assert evictions(fake) == []


def test_pods_of_another_scheduler_are_refused(cluster: Any) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)
    foreign = pod("tp4", 4, priority=ONLINE, guaranteed=True)
    foreign["spec"]["schedulerName"] = "default-scheduler"
    fake.add(foreign)
    assert "not 'tidal-scheduler'" in extender.filter(filter_args(foreign, ["cube-a"]))["Error"]
    assert (
        "not 'tidal-scheduler'"
        in extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-b"))["Error"]
    )
    assert evictions(fake) == []
    assert "nodeName" not in fake.pods["tp4"]["spec"]


def test_bind_only_to_a_node_the_filter_passed(cluster: Any) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)  # cube-a has no free NVLink quad
    tp4 = fake.add(pod("tp4", 4, priority=BATCH, guaranteed=True))
    unfiltered = extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-b"))
    assert "did not pass tidal's filter" in unfiltered["Error"]
    assert extender.filter(filter_args(tp4, ["cube-b"]))["NodeNames"] == ["cube-b"]
    assert "did not pass" in extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-a"))["Error"]
    assert extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-b")) == {"Error": ""}
    assert fake.pods["tp4"]["spec"]["nodeName"] == "cube-b"


def test_a_forged_preempt_body_writes_no_reservation(cluster: Any) -> None:
    extender, fake = cluster
    for gpu in range(8):
        fake.add(pod(f"f{gpu}", 1, node="cube-a", held=[gpu]))
    victims = {"cube-a": {"Pods": [{"UID": f"uid-f{g}"} for g in range(8)]}}
    made_up = pod("ghost", 4, priority=ONLINE)
    result = extender.preempt(parse_preempt({"Pod": made_up, "NodeNameToMetaVictims": victims}))
    assert result == {"NodeNameToMetaVictims": {}}
    assert extender.cache.snapshot.reservations == {}
    assert not any(kind == "reserve" for kind, _ in fake.calls)


# -- 2. no object freezes the cache ----------------------------------------------------------


def problems_of(cache: ClusterCache) -> list[str]:
    seen: list[str] = []
    cache.on_problem = lambda kind, obj, error: seen.append(str(error))
    return seen


def test_a_bad_checkpoint_interval_is_reported_and_the_gpus_stay_held() -> None:
    cache = ClusterCache()
    seen = problems_of(cache)
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    bad = pod("w", 2, node="n", held=[2, 3])
    bad["metadata"]["annotations"]["tidal.dev/checkpoint-interval-seconds"] = "abc"
    cache.replace("pods", [bad, pod("v", 1, node="n", held=[5])])
    assert cache.snapshot.nodes["n"].used == 0b0010_1100
    assert any("checkpoint-interval-seconds" in p and "'abc'" in p for p in seen)
    # events after it still apply: a deleted pod frees its GPUs
    cache.apply("pods", "DELETED", pod("v", 1, node="n", held=[5]))
    assert cache.snapshot.nodes["n"].used == 0b1100


@pytest.mark.parametrize(
    "record",
    [
        {"node": "n", "gpus": [-1], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": [99], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": [9], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": "0,1", "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": [0, 0], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": 1, "gpus": [0], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": [0], "victims": [3], "expiresAt": "2100-01-01T00:00:00Z"},
        {"node": "n", "gpus": [0], "victims": [], "expiresAt": "soon"},
        ["not", "an", "object"],
    ],
)
def test_a_malformed_reservation_is_reported_and_ignored(record: Any) -> None:
    cache = ClusterCache(clock=lambda: NOW)
    seen = problems_of(cache)
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    preemptor = pod("p", 1)
    preemptor["status"]["conditions"] = [reservation_condition(record)]
    cache.replace("pods", [preemptor, pod("w", 1, node="n", held=[1])])
    assert cache.snapshot.reservations == {}
    assert any("tidal.dev/reservation" in p for p in seen)
    cache.apply("pods", "DELETED", pod("w", 1, node="n", held=[1]))
    assert cache.snapshot.nodes["n"].used == 0


def test_a_reservation_in_an_annotation_is_not_a_reservation() -> None:
    """Anyone who can create a pod can write annotations (an LLMService's podMetadata too);
    only the extender writes pod status."""
    cache = ClusterCache(clock=lambda: NOW)
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    forged = pod("squatter", 1)
    record = {
        "node": "n",
        "gpus": list(range(8)),
        "victims": [],
        "expiresAt": "2100-01-01T00:00:00Z",
    }
    forged["metadata"]["annotations"][CONDITION_RESERVATION] = json.dumps(record)
    cache.replace("pods", [forged])
    assert cache.snapshot.reservations == {}
    assert cache.snapshot.free_gpus("n", "someone-else") == 0xFF


def test_a_reservation_expiry_is_bounded() -> None:
    cache = ClusterCache(clock=lambda: NOW, max_reservation_s=600)
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    preemptor = pod("p", 4)
    record = {"node": "n", "gpus": [0, 1, 2, 3], "victims": [], "expiresAt": "2100-01-01T00:00:00Z"}
    preemptor["status"]["conditions"] = [reservation_condition(record)]
    cache.replace("pods", [preemptor])
    assert cache.snapshot.reservations["uid-p"].expires_at == NOW + 600


def test_a_corrupted_gpu_annotation_keeps_the_last_good_set() -> None:
    cache = ClusterCache()
    seen = problems_of(cache)
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    cache.upsert_pod(pod("w", 2, node="n", held=[2, 3]))
    for text in ("abc", "0,1,2,3", "7,8", ""):
        broken = pod("w", 2, node="n")
        broken["metadata"]["annotations"]["tidal.dev/gpus"] = text
        cache.upsert_pod(broken)
        assert cache.snapshot.pods["uid-w"].gpus == 0b1100, text
    assert len(seen) == 4


def test_after_a_restart_a_pod_of_unknown_gpus_holds_every_unclaimed_gpu() -> None:
    """A restarted extender that never saw the pod's good annotation cannot know which GPUs the
    device plugin gave it: it leaves every GPU idle that it might hold, and shrinks that hold
    as the other pods on the node show theirs."""
    broken = pod("w", 2, node="n")
    broken["metadata"]["annotations"]["tidal.dev/gpus"] = "abc"
    for order in (
        [broken, pod("v", 2, node="n", held=[0, 1])],
        [pod("v", 2, node="n", held=[0, 1]), broken],
    ):
        cache = ClusterCache()
        cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
        cache.replace("pods", order)
        assert cache.snapshot.pods["uid-w"].gpus == 0b1111_1100
        assert cache.snapshot.pods["uid-v"].gpus == 0b11
        cache.apply("pods", "DELETED", pod("v", 2, node="n", held=[0, 1]))
        assert cache.snapshot.nodes["n"].used == 0b1111_1100
        fixed = pod("w", 2, node="n", held=[4, 5])
        cache.apply("pods", "MODIFIED", fixed)
        assert cache.snapshot.nodes["n"].used == 0b11_0000


def test_two_pods_claiming_one_gpu_keep_every_claimed_gpu_held() -> None:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    cache.replace("pods", [pod("a", 2, node="n", held=[0, 1]), pod("b", 2, node="n", held=[1, 2])])
    assert cache.snapshot.nodes["n"].used == 0b111
    cache.apply("pods", "DELETED", pod("a", 2, node="n", held=[0, 1]))
    assert cache.snapshot.pods["uid-b"].gpus == 0b110


def test_a_gpu_annotation_on_a_pod_without_gpus_holds_nothing() -> None:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    cpu_only = pod("cpu", 0, node="n", held=list(range(8)))
    cache.replace("pods", [cpu_only])
    assert cache.snapshot.nodes["n"].used == 0


def test_a_change_that_raises_is_counted_and_the_next_ones_apply(monkeypatch: Any) -> None:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    real = cache.upsert_pod

    def flaky(obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == "boom":
            raise RuntimeError("a bug")
        real(obj)

    monkeypatch.setattr(cache, "upsert_pod", flaky)
    cache.replace("pods", [pod("boom", 1, node="n", held=[0]), pod("ok", 1, node="n", held=[1])])
    cache.apply("pods", "ADDED", pod("boom", 1, node="n", held=[0]))
    cache.apply("pods", "ADDED", pod("late", 1, node="n", held=[2]))
    assert cache.apply_failures == {"pods": 2}
    assert cache.snapshot.nodes["n"].used == 0b110
    assert "pods" in cache.synced


# -- the fuzz: random pods, random annotations, random event order ----------------------------

NODES = ("n0", "n1")
GPU_TEXTS = st.one_of(
    st.sampled_from(["0", "1", "0,1", "2,3", "4,5,6,7", "0,1,2,3", "abc", "-1", "9", "", "1,1"]),
    st.text(max_size=6),
)
ANNOTATION_VALUES = st.one_of(st.text(max_size=8), st.sampled_from(["abc", "-3", "1e999", "nan"]))


@st.composite
def pod_objects(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5"]))
    gpus = draw(st.sampled_from([0, 1, 2, 4]))
    bound = draw(st.booleans())
    obj = pod(name, gpus, node=draw(st.sampled_from(NODES)) if bound else None)
    notes = obj["metadata"]["annotations"]
    if draw(st.booleans()):
        notes["tidal.dev/gpus"] = draw(GPU_TEXTS)
    for key in (
        "tidal.dev/checkpoint-interval-seconds",
        "tidal.dev/topology-mode",
        CONDITION_RESERVATION,
    ):
        if draw(st.booleans()):
            notes[key] = draw(ANNOTATION_VALUES)
    if draw(st.booleans()):
        text = draw(st.one_of(st.text(max_size=12), st.just('{"node":"n0","gpus":[-1]}')))
        obj["status"]["conditions"] = [
            {"type": CONDITION_RESERVATION, "status": "True", "message": text}
        ]
    if draw(st.integers(0, 9)) == 0:
        obj["status"]["phase"] = "Succeeded"
    if draw(st.integers(0, 9)) == 0:
        obj["spec"]["priority"] = draw(st.one_of(st.text(max_size=3), st.none(), st.floats()))
    return obj


events = st.lists(
    st.tuples(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]), pod_objects()), max_size=25
)


def claimed(obj: dict[str, Any]) -> int | None:
    """The GPUs a live bound pod holds in truth when its annotation is good, else None."""
    requested = int(obj["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    text = obj["metadata"]["annotations"].get("tidal.dev/gpus")
    try:
        mask = parse_gpu_list(text, "x", 8) if isinstance(text, str) else 0
    except ObjectError:
        return None
    return mask if mask.bit_count() == requested and requested else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_fuzzed_events_never_stop_the_cache_nor_lose_a_held_gpu(
    stream: list[tuple[str, dict[str, Any]]],
) -> None:
    cache = ClusterCache(clock=lambda: NOW)
    cache.on_problem = lambda kind, obj, error: None
    cache.replace("nodes", [gpu_node(n, "dgx1-v100") for n in NODES])
    live: dict[str, dict[str, Any]] = {}
    for kind, obj in stream:
        cache.apply("pods", kind, obj)
        if kind == "DELETED" or obj["status"]["phase"] == "Succeeded":
            live.pop(obj["metadata"]["uid"], None)
        else:
            live[obj["metadata"]["uid"]] = obj
    assert cache.apply_failures == {}
    # No event lost: the cache holds exactly the live GPU pods, and a relist changes nothing.
    gpu_pods = {u for u, o in live.items() if claimed(o) != 0 and _requested(o) > 0}
    assert set(cache.pending) | {u for u in cache.snapshot.pods if u.startswith("uid-")} <= set(
        live
    )
    bound = {u for u in gpu_pods if live[u]["spec"].get("nodeName")}
    assert bound <= set(cache.snapshot.pods)
    # Every GPU a live pod holds in truth is held in the cache, and never by two pods.
    for node in NODES:
        state = cache.snapshot.nodes[node]
        total = sum(p.gpus.bit_count() for p in state.pods)
        assert total == state.used.bit_count(), "a GPU counted twice"
        for uid in bound:
            obj = live[uid]
            truth = claimed(obj)
            if obj["spec"]["nodeName"] == node and truth is not None:
                assert truth & ~state.used == 0, f"{uid} holds {bits(truth)}, not all held"


def _requested(obj: dict[str, Any]) -> int:
    return int(obj["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def test_reservation_records_round_trip() -> None:
    record = ReservationRecord("n", (0, 1), ("uid-v",), NOW)
    assert ReservationRecord.parse(record.to_message(), "ns/p") == record

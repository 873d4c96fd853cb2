"""The extender's verbs over its cache, with a fake cluster (no API server; e2e covers that).

Nodes are DGX-1V: NVLink cliques of four are {0,1,2,3} and {4,5,6,7}; {2,3,6,7} is not one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tidal.api import CONDITION_RESERVATION
from tidal.devcluster.nodes import gpu_node
from tidal.kubeclient import KubeApiError
from tidal.node_agent.facts import fake_facts
from tidal.node_agent.publish import Discovery, gpu_topology
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender, ExtenderSettings
from tidal.scheduler_extender.filtering import has_soft_preferences
from tidal.scheduler_extender.translate import reservation_message
from tidal.scheduler_extender.wire import (
    BindArgs,
    WireError,
    parse_bind,
    parse_filter,
    parse_preempt,
)

QUADS = ({0, 1, 2, 3}, {4, 5, 6, 7})
BATCH, ONLINE = 10, 1000


def pod(
    name: str,
    gpus: int,
    *,
    node: str | None = None,
    held: list[int] | None = None,
    priority: int = BATCH,
    guaranteed: bool = False,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    notes = {}
    if held is not None:
        notes["tidal.dev/gpus"] = ",".join(map(str, held))
    if guaranteed:
        notes["tidal.dev/topology-mode"] = "guaranteed"
    spec: dict[str, Any] = {
        "priority": priority,
        "schedulerName": "tidal-scheduler",
        "containers": [{"name": "w", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
    }
    if node:
        spec["nodeName"] = node
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "annotations": notes,
            "labels": labels or {},
            "creationTimestamp": "2026-11-23T00:00:00Z",
        },
        "spec": spec,
        "status": {"phase": "Running" if node else "Pending"},
    }


class FakeCluster:
    """Actions that change the raw objects and feed them back, as watch events would."""

    def __init__(self, cache: ClusterCache) -> None:
        self.cache = cache
        self.pods: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse_eviction: set[str] = set()

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.pods[obj["metadata"]["name"]] = obj
        self.cache.upsert_pod(obj)
        return obj

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pods.get(name)

    def _condition(self, name: str, condition: dict[str, str]) -> None:
        status = self.pods[name].setdefault("status", {})
        others = [c for c in status.get("conditions", []) if c["type"] != condition["type"]]
        status["conditions"] = [*others, condition]
        self.cache.upsert_pod(self.pods[name])

    def set_reservation(self, namespace: str, name: str, message: str) -> None:
        self.calls.append(("reserve", name))
        self._condition(name, {"type": CONDITION_RESERVATION, "status": "True", "message": message})

    def end_reservation(self, namespace: str, name: str, reason: str) -> None:
        self.calls.append((f"end-reservation:{reason}", name))
        self._condition(name, {"type": CONDITION_RESERVATION, "status": "False", "reason": reason})

    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None:
        self.calls.append(("bind", name))
        self.pods[name]["spec"]["nodeName"] = node
        self.pods[name]["metadata"]["annotations"].update(annotations)
        self.cache.upsert_pod(self.pods[name])

    def mark_disruption_target(self, namespace: str, name: str, message: str) -> None:
        self.calls.append(("disruption-target", name))

    def evict(self, namespace: str, name: str) -> None:
        if name in self.refuse_eviction:
            raise KubeApiError(
                429,
                f"evict {name}: Cannot evict pod as it would violate the pod's disruption budget",
            )
        self.calls.append(("evict", name))

    def record_event(self, pod: dict[str, Any], reason: str, message: str) -> None:
        self.calls.append((f"event:{reason}", pod["metadata"]["name"]))

    def finish_evictions(self) -> None:
        for kind, name in self.calls:
            if kind == "evict" and name in self.pods:
                self.cache.delete_pod(self.pods.pop(name)["metadata"]["uid"])


@pytest.fixture
def cluster() -> tuple[Extender, FakeCluster]:
    clock = [1_000_000.0]
    cache = ClusterCache(clock=lambda: clock[0])
    cache.replace("nodes", [gpu_node("cube-a", "dgx1-v100"), gpu_node("cube-b", "dgx1-v100")])
    cache.replace("pdbs", [])
    fake = FakeCluster(cache)
    extender = Extender(cache, fake, ExtenderSettings(reservation_ttl_s=60))
    extender.clock = clock  # type: ignore[attr-defined]
    return extender, fake


def filter_args(p: dict[str, Any], names: list[str]) -> Any:
    return parse_filter({"Pod": p, "NodeNames": names})


def held_gpus(fake: FakeCluster, name: str) -> set[int]:
    return {int(i) for i in fake.pods[name]["metadata"]["annotations"]["tidal.dev/gpus"].split(",")}


# -- wire format ------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [("Pod", "NodeNames"), ("pod", "nodenames"), ("POD", "nodeNames")])
def test_filter_args_accept_any_casing(keys: tuple[str, str]) -> None:
    args = parse_filter({keys[0]: pod("p", 1), keys[1]: ["a", "b"]})
    assert args.node_names == ["a", "b"]
    assert args.nodes is None


def test_full_node_list_mode_answers_with_node_objects(cluster: Any) -> None:
    extender, fake = cluster
    nodes = [gpu_node("cube-a", "dgx1-v100"), gpu_node("ghost", "dgx1-v100")]
    result = extender.filter(
        parse_filter({"pod": fake.add(pod("p", 4, guaranteed=True)), "nodes": {"items": nodes}})
    )
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["cube-a"]
    assert result["NodeNames"] is None
    alone = extender.filter(
        parse_filter({"pod": fake.add(pod("q", 4)), "nodes": {"items": nodes[1:]}})
    )
    assert alone["Nodes"] == {"items": []}
    assert "not in the scheduler's cache" in alone["FailedAndUnresolvableNodes"]["ghost"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "Pod"),
        ({"Pod": pod("p", 1)}, "NodeNames"),
        ({"Pod": {"metadata": {"name": "x"}}, "NodeNames": []}, "uid"),
        ({"Pod": pod("p", 1), "NodeNames": "a"}, "NodeNames"),
        ([], "object"),
    ],
)
def test_malformed_filter_args_name_the_field(raw: Any, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse_filter(raw)


def test_bind_and_preempt_args() -> None:
    bind = parse_bind({"podName": "p", "PODNAMESPACE": "ns", "PodUID": "u", "node": "n"})
    assert bind == BindArgs("p", "ns", "u", "n")
    with pytest.raises(WireError, match="PodUID"):
        parse_bind({"PodName": "p", "PodNamespace": "ns", "Node": "n"})
    meta = parse_preempt(
        {"Pod": pod("p", 1), "NodeNameToMetaVictims": {"n": {"Pods": [{"UID": "v"}]}}}
    )
    assert meta.candidates == {"n": ["v"]}
    full = parse_preempt({"pod": pod("p", 1), "nodeNameToVictims": {"n": {"pods": [pod("v", 1)]}}})
    assert full.candidates == {"n": ["uid-v"]}


# -- filter, prioritize, bind ------------------------------------------------------------------


def test_filter_passes_only_nodes_with_a_free_aligned_set(cluster: Any) -> None:
    extender, fake = cluster
    for i, gpu in enumerate((0, 1, 4, 5)):
        fake.add(pod(f"b{i}", 1, node="cube-a", held=[gpu]))
    tp4 = pod("tp4", 4, priority=ONLINE, guaranteed=True)
    tp4["spec"]["topologySpreadConstraints"] = [{"whenUnsatisfiable": "ScheduleAnyway"}]
    fake.add(tp4)  # with a soft preference: every fitting node passes, the others say why
    result = extender.filter(filter_args(tp4, ["cube-a", "cube-b"]))
    assert result["NodeNames"] == ["cube-b"]
    assert result["FailedNodes"] == {"cube-a": "no 4 free GPUs aligned at tier nvlink (4 free)"}
    scores = extender.prioritize(filter_args(tp4, ["cube-a", "cube-b"]))
    assert scores[0] == {"Host": "cube-a", "Score": 0}
    assert scores[1]["Score"] > 0


def test_a_pod_without_soft_preferences_gets_one_node_so_kube_scheduler_skips_scoring(
    cluster: Any,
) -> None:
    """kube-scheduler binds a lone passing node without scoring or calling prioritize: the
    pod goes where tidal's ranking puts it (the fuller node), in one round trip."""
    extender, fake = cluster
    fake.add(pod("b0", 1, node="cube-a", held=[0]))
    single = fake.add(pod("single", 1))
    result = extender.filter(filter_args(single, ["cube-a", "cube-b"]))
    assert result["NodeNames"] == ["cube-a"]
    # the others are left out, not failed: the maps only explain a pod that fits nowhere
    assert result["FailedNodes"] == {} and result["FailedAndUnresolvableNodes"] == {}
    assert extender.bind(BindArgs("single", "ns", "uid-single", "cube-a"))["Error"] == ""
    assert fake.calls[-1] == ("bind", "single")


@pytest.mark.parametrize(
    "preference",
    [
        {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}}]}}},
        {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}},
        {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway"}]},
    ],
)  # fmt: skip
def test_a_pod_with_soft_preferences_gets_every_fitting_node_and_scores(
    cluster: Any, preference: dict[str, Any]
) -> None:
    extender, fake = cluster
    fake.add(pod("b0", 1, node="cube-a", held=[0]))
    spread = pod("spread", 1)
    spread["spec"].update(preference)
    fake.add(spread)
    result = extender.filter(filter_args(spread, ["cube-a", "cube-b"]))
    assert result["NodeNames"] == ["cube-a", "cube-b"]
    answer = extender.prioritize(filter_args(spread, ["cube-a", "cube-b"]))
    scores = {s["Host"]: s["Score"] for s in answer}
    assert scores["cube-a"] > scores["cube-b"] > 0


def test_filter_answers_on_the_event_loop_only_what_the_cache_decides(cluster: Any) -> None:
    """filter_from_cache (the server's event-loop path) gives filter's answer for a cached pod
    that fits, and hands every other case to filter in a thread: a pod the watch has not
    delivered (filter reads it from the API server), a pod that needs a preemption (filter
    evicts), a pod filter refuses."""
    extender, fake = cluster
    fits = fake.add(pod("fits", 1))
    on_loop = extender.filter_from_cache(filter_args(fits, ["cube-a", "cube-b"]))
    assert on_loop is not None and on_loop["NodeNames"] == ["cube-a"] and on_loop["Error"] == ""
    assert on_loop == extender.filter(filter_args(fits, ["cube-a", "cube-b"]))
    unseen = pod("unseen", 1)
    fake.pods["unseen"] = unseen  # in the API server, not yet in the cache
    assert extender.filter_from_cache(filter_args(unseen, ["cube-a"])) is None
    assert extender.filter(filter_args(unseen, ["cube-a"]))["NodeNames"] == ["cube-a"]
    for i in range(8):
        fake.add(pod(f"b{i}", 1, node="cube-a", held=[i]))
    tp8 = fake.add(pod("tp8", 8, priority=ONLINE))
    assert extender.filter_from_cache(filter_args(tp8, ["cube-a"])) is None
    foreign = pod("foreign", 1)
    foreign["spec"]["schedulerName"] = "default-scheduler"
    fake.add(foreign)
    assert extender.filter_from_cache(filter_args(foreign, ["cube-b"])) is None
    assert "not 'tidal-scheduler'" in extender.filter(filter_args(foreign, ["cube-b"]))["Error"]


def test_hard_constraints_are_not_soft_preferences() -> None:
    required = pod("p", 1)
    required["spec"]["affinity"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}
    }
    required["spec"]["topologySpreadConstraints"] = [{"whenUnsatisfiable": "DoNotSchedule"}]
    assert not has_soft_preferences(required)
    assert not has_soft_preferences({"spec": "not an object"})


def test_filter_ranks_by_the_demand_it_has_seen(cluster: Any) -> None:
    """cube-a has one free NVLink quad, cube-b five scattered GPUs. Packing alone puts a 1-GPU
    pod on cube-a (fuller) and breaks the quad; once filter has seen mostly 4-GPU guaranteed
    pods, the fragmentation that costs them decides, and the pod goes to cube-b."""
    extender, fake = cluster
    for gpu in (0, 1, 2, 3):
        fake.add(pod(f"a{gpu}", 1, node="cube-a", held=[gpu]))
    for gpu in (1, 3, 5):
        fake.add(pod(f"b{gpu}", 1, node="cube-b", held=[gpu]))
    first = fake.add(pod("first", 1))
    assert extender.filter(filter_args(first, ["cube-a", "cube-b"]))["NodeNames"] == ["cube-a"]
    for i in range(8):
        tp4 = fake.add(pod(f"tp4-{i}", 4, priority=ONLINE, guaranteed=True))
        extender.filter(filter_args(tp4, ["cube-a"]))
    single = fake.add(pod("single", 1))
    assert extender.filter(filter_args(single, ["cube-a", "cube-b"]))["NodeNames"] == ["cube-b"]


def test_prioritize_orders_nodes_as_filter_ranks_them(cluster: Any) -> None:
    """The prioritize score follows the whole rank (demand-weighted fragmentation first), not
    intact capacity alone: once 4-GPU guaranteed demand dominates, a 1-GPU pod with a soft
    preference scores cube-b (scattered GPUs) over cube-a (its last free quad), both from the
    filter's remembered scores and when ranked afresh (an extender restarted in between)."""
    extender, fake = cluster
    for gpu in (0, 1, 2, 3):
        fake.add(pod(f"a{gpu}", 1, node="cube-a", held=[gpu]))
    for gpu in (1, 3, 5):
        fake.add(pod(f"b{gpu}", 1, node="cube-b", held=[gpu]))
    for i in range(8):
        tp4 = fake.add(pod(f"tp4-{i}", 4, priority=ONLINE, guaranteed=True))
        extender.filter(filter_args(tp4, ["cube-a"]))
    spread = pod("spread", 1)
    spread["spec"]["topologySpreadConstraints"] = [{"whenUnsatisfiable": "ScheduleAnyway"}]
    fake.add(spread)
    names = ["cube-a", "cube-b"]
    assert extender.filter(filter_args(spread, names))["NodeNames"] == names
    remembered = {s["Host"]: s["Score"] for s in extender.prioritize(filter_args(spread, names))}
    assert remembered == {"cube-a": 1, "cube-b": 10}
    afresh = {s["Host"]: s["Score"] for s in extender.prioritize(filter_args(spread, names))}
    assert afresh == remembered


def test_bind_writes_an_aligned_set_and_never_double_allocates(cluster: Any) -> None:
    extender, fake = cluster
    fake.add(pod("b0", 4, node="cube-a", held=[0, 1, 2, 3]))
    for name in ("tp4-x", "tp4-y"):
        extender.filter(filter_args(fake.add(pod(name, 4, priority=ONLINE)), ["cube-a"]))
    first = extender.bind(BindArgs("tp4-x", "ns", "uid-tp4-x", "cube-a"))
    assert first == {"Error": ""}
    assert held_gpus(fake, "tp4-x") == {4, 5, 6, 7}
    second = extender.bind(BindArgs("tp4-y", "ns", "uid-tp4-y", "cube-a"))
    assert "taken meanwhile" in second["Error"]
    assert "nodeName" not in fake.pods["tp4-y"]["spec"]


def test_bind_of_an_unknown_pod_is_an_error_not_a_crash(cluster: Any) -> None:
    extender, _ = cluster
    assert "does not exist" in extender.bind(BindArgs("nope", "ns", "uid-nope", "cube-a"))["Error"]


# -- preemption --------------------------------------------------------------------------------


def fill_cross_pattern(fake: FakeCluster, node: str = "cube-a") -> None:
    """GPUs 0,1,4,5 busy: four free by count, no free NVLink quad."""
    for i, gpu in enumerate((0, 1, 4, 5)):
        fake.add(pod(f"b{i}", 1, node=node, held=[gpu], labels={"app": f"b{i}"}))


def test_topology_only_conflict_evicts_reserves_and_then_binds_the_reserved_set(
    cluster: Any,
) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)
    preemptor = fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True))
    result = extender.filter(filter_args(preemptor, ["cube-a"]))
    assert result["NodeNames"] == []
    assert result["FailedAndUnresolvableNodes"] == {
        "cube-a": "waiting for 2 victims on node cube-a"
    }
    evicted = sorted(name for kind, name in fake.calls if kind == "evict")
    assert evicted in (["b0", "b1"], ["b2", "b3"])
    assert sorted(n for k, n in fake.calls if k == "event:Preempted") == evicted
    assert sorted(n for k, n in fake.calls if k == "disruption-target") == evicted
    record = json.loads(reservation_message(fake.pods["tp4"]) or "")
    assert set(record["gpus"]) in QUADS and record["node"] == "cube-a"
    # A restarted extender sees the same reservation from the pod condition.
    rebuilt = ClusterCache(clock=extender.cache.clock)
    rebuilt.replace("nodes", [gpu_node("cube-a", "dgx1-v100"), gpu_node("cube-b", "dgx1-v100")])
    rebuilt.replace("pods", list(fake.pods.values()))
    assert rebuilt.snapshot.reservations == extender.cache.snapshot.reservations
    # Another pod may not take the reserved GPUs once they are free.
    fake.finish_evictions()
    other = fake.add(pod("other", 4, priority=ONLINE, guaranteed=True))
    assert extender.filter(filter_args(other, ["cube-a"]))["NodeNames"] == []
    # (it plans its own preemption of the other quad's batch pods instead)
    others = extender.cache.snapshot.reservations["uid-other"]
    assert others.gpus & extender.cache.snapshot.reservations["uid-tp4"].gpus == 0
    # The preemptor passes only its reserved node and binds exactly the reserved set.
    assert extender.filter(filter_args(preemptor, ["cube-a", "cube-b"]))["NodeNames"] == ["cube-a"]
    assert extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-a")) == {"Error": ""}
    assert held_gpus(fake, "tp4") == set(record["gpus"])
    assert reservation_message(fake.pods["tp4"]) is None
    assert ("end-reservation:Bound", "tp4") in fake.calls
    assert "uid-tp4" not in extender.cache.snapshot.reservations


def test_refused_eviction_releases_the_reservation(cluster: Any) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)
    fake.refuse_eviction = {"b0", "b1", "b2", "b3"}
    preemptor = fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True))
    result = extender.filter(filter_args(preemptor, ["cube-a"]))
    assert "disruption budget" in result["FailedAndUnresolvableNodes"]["cube-a"]
    assert extender.cache.snapshot.reservations == {}
    assert reservation_message(fake.pods["tp4"]) is None


def test_pdb_steers_the_plan_to_the_other_clique(cluster: Any) -> None:
    extender, fake = cluster
    extender.cache.upsert_pdb(
        {
            "metadata": {"name": "keep-b0", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "b0"}}},
            "status": {"disruptionsAllowed": 0},
        }
    )
    fill_cross_pattern(fake)
    extender.filter(
        filter_args(fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True)), ["cube-a"])
    )
    assert sorted(n for k, n in fake.calls if k == "evict") == ["b2", "b3"]


def test_count_conflict_is_answered_by_the_preempt_verb_on_one_node(cluster: Any) -> None:
    extender, fake = cluster
    for gpu in range(8):
        fake.add(pod(f"f{gpu}", 1, node="cube-a", held=[gpu]))
    preemptor = fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True))
    proposed = {"cube-a": {"Pods": [{"UID": f"uid-f{g}"} for g in range(8)]}}
    result = extender.preempt(parse_preempt({"Pod": preemptor, "NodeNameToMetaVictims": proposed}))
    ((node, victims),) = result["NodeNameToMetaVictims"].items()
    assert node == "cube-a" and victims["NumPDBViolations"] == 0
    gpus = {int(v["UID"].removeprefix("uid-f")) for v in victims["Pods"]}
    assert gpus in QUADS
    assert reservation_message(fake.pods["tp4"]) is not None
    # Asked again while the reservation stands: no second preemption.
    again = extender.preempt(parse_preempt({"Pod": preemptor, "NodeNameToMetaVictims": proposed}))
    assert again == {"NodeNameToMetaVictims": {}}


def test_preempt_never_answers_a_node_without_victims(cluster: Any) -> None:
    extender, fake = cluster
    preemptor = fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True))
    result = extender.preempt(
        parse_preempt({"Pod": preemptor, "NodeNameToMetaVictims": {"cube-a": {"Pods": []}}})
    )
    assert result == {"NodeNameToMetaVictims": {}}


def test_reservations_expire_and_their_annotation_is_cleared(cluster: Any) -> None:
    extender, fake = cluster
    fill_cross_pattern(fake)
    preemptor = fake.add(pod("tp4", 4, priority=ONLINE, guaranteed=True))
    extender.filter(filter_args(preemptor, ["cube-a"]))
    assert extender.cache.snapshot.reservations
    extender.clock[0] += 61
    expired = extender.expire_reservations()
    assert [r.preemptor for r in expired] == ["uid-tp4"]
    assert reservation_message(fake.pods["tp4"]) is None
    assert ("end-reservation:Expired", "tp4") in fake.calls


def published(node: str, preset: str) -> dict[str, Any]:
    """The GPUTopology a node agent in fake mode publishes for ``node``."""
    return gpu_topology(Discovery.of(node, fake_facts(preset, node)), node_uid="u")


def test_a_published_gputopology_is_the_nodes_topology() -> None:
    cache = ClusterCache()
    bare = gpu_node("agent-node", "dgx1-v100")
    del bare["metadata"]["labels"]["tidal.dev/topology-preset"]
    cache.replace("nodes", [bare])
    assert "no GPUTopology object" in cache.node_problems["agent-node"]
    cache.replace("gputopologies", [published("agent-node", "dgx1-v100")])
    assert "agent-node" not in cache.node_problems
    shape = cache.snapshot.nodes["agent-node"].info.shape
    assert shape.link_names[0][3] == "NV2"
    # a heartbeat (same spec) keeps the compiled shape; shapes are shared between nodes
    cache.apply("gputopologies", "MODIFIED", published("agent-node", "dgx1-v100"))
    assert cache.snapshot.nodes["agent-node"].info.shape is shape
    # the published topology wins over the preset label
    labelled = gpu_node("labelled", "pcie-8x-l40s")
    cache.apply("nodes", "ADDED", labelled)
    cache.apply("gputopologies", "ADDED", published("labelled", "dgx-h100"))
    assert cache.snapshot.nodes["labelled"].info.shape.link_names[0][7] == "NV18"
    cache.apply("gputopologies", "DELETED", published("labelled", "dgx-h100"))
    assert cache.snapshot.nodes["labelled"].info.shape.link_names[0][7] == "SYS"


def test_a_broken_gputopology_is_ignored_and_pods_survive_a_topology_change() -> None:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    cache.upsert_pod(pod("w", 4, node="n", held=[0, 1, 2, 3]))
    broken = published("n", "dgx-h100")
    broken["spec"]["sockets"] = []
    cache.upsert_topology(broken)
    assert cache.snapshot.nodes["n"].info.shape.link_names[0][7] == "SYS"  # unchanged
    cache.upsert_topology(published("n", "dgx-h100"))
    state = cache.snapshot.nodes["n"]
    assert state.info.shape.link_names[0][7] == "NV18"
    assert [p.uid for p in state.pods] == ["uid-w"]
    assert state.used == 0b1111


def with_health(obj: dict[str, Any], healthy: str) -> dict[str, Any]:
    return {**obj, "status": {"gpuCount": 8, "healthyGPUs": healthy}}


def test_unhealthy_gpus_are_never_placed_on_nor_freed_by_preemption(cluster: Any) -> None:
    extender, fake = cluster
    cache = fake.cache
    cache.upsert_topology(with_health(published("cube-a", "dgx1-v100"), "0,1,2,4,5,6,7"))
    cache.upsert_topology(with_health(published("cube-b", "dgx1-v100"), "0,1,2,3,4,5,6,7"))
    assert extender.stats()["unhealthy_gpus"] == 1
    fake.add(pod("b-low", 4, node="cube-b", held=[4, 5, 6, 7]))
    # cube-a has one whole NVLink quad left ({4,5,6,7}); GPU 3 spoils the other
    first = fake.add(pod("tp4-a", 4, priority=ONLINE, guaranteed=True))
    result = extender.filter(filter_args(first, ["cube-a"]))
    assert result["NodeNames"] == ["cube-a"]  # its healthy quad
    result = extender.filter(filter_args(first, ["cube-a", "cube-b"]))
    assert result["NodeNames"] == ["cube-b"]  # the fuller node: tidal's one choice
    fake.add(pod("tp4-a", 4, node="cube-a", held=[4, 5, 6, 7], priority=ONLINE))
    fake.add(pod("tp4-b", 4, node="cube-b", held=[0, 1, 2, 3], priority=ONLINE))
    # now only a preemption on cube-b can make room; cube-a's quad {0,1,2,3} has a bad GPU
    # that no eviction can fix, so the plan must not pick cube-a
    preemptor = pod("tp4-c", 4, priority=ONLINE + 1, guaranteed=True)
    fake.add(preemptor)
    result = extender.filter(filter_args(preemptor, ["cube-a", "cube-b"]))
    assert "cube-a" not in (result["NodeNames"] or [])
    assert "cube-a" in result["FailedAndUnresolvableNodes"]
    assert ("evict", "b-low") in fake.calls  # the plan frees cube-b's quad, never cube-a's
    # the GPU recovers: the fence goes
    cache.upsert_topology(with_health(published("cube-a", "dgx1-v100"), "0,1,2,3,4,5,6,7"))
    assert "tidal.dev/unhealthy-gpus/cube-a" not in cache.snapshot.pods
    assert extender.stats()["unhealthy_gpus"] == 0


def test_a_pod_on_a_gpu_that_went_bad_keeps_it_until_it_leaves() -> None:
    cache = ClusterCache()
    cache.replace("nodes", [gpu_node("n", "dgx1-v100")])
    cache.upsert_pod(pod("w", 2, node="n", held=[2, 3]))
    cache.upsert_topology(with_health(published("n", "dgx1-v100"), "0,1,2,4,5,6,7"))
    fence = "tidal.dev/unhealthy-gpus/n"
    assert fence not in cache.snapshot.pods  # GPU 3 is the pod's; nothing else to hold
    cache.delete_pod("uid-w")
    assert cache.snapshot.pods[fence].gpus == 1 << 3
    assert cache.snapshot.nodes["n"].used == 1 << 3
    cache.upsert_pod(pod("late", 1, node="n", held=[3]))  # bound outside tidal: no conflict
    assert cache.snapshot.pods["uid-late"].gpus == 1 << 3
    assert fence not in cache.snapshot.pods

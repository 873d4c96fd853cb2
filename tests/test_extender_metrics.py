"""The extender's metrics as Prometheus reads them: the exposition lines of a cache with known
pods and GPUs, and the counters a preemption and a bind leave.

Nodes are DGX-1V. Its distinct topology domains and their weights |d|² in the intact capacity:
the NVLink quads {0-3}, {4-7} (16 each), the NVLink pairs across them {0,4} {1,5} {2,6} {3,7}
and the PCIe-switch pairs {0,1} {2,3} {4,5} {6,7} (4 each), the node (64): 128 for a free node.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from tests.test_extender import FakeCluster, filter_args, pod, published, with_health
from tidal.devcluster.nodes import gpu_node
from tidal.scheduler_extender.cache import WATCHED_KINDS, ClusterCache
from tidal.scheduler_extender.extender import Extender, ExtenderSettings
from tidal.scheduler_extender.translate import ReservationRecord
from tidal.scheduler_extender.wire import BindArgs, parse_preempt

STARTED = 1_795_392_000.0  # the pods' creationTimestamp, 2026-11-23T00:00:00Z
ONLINE, BATCH = 1_000_000, 1_000


def tidal_pod(
    name: str,
    gpus: int,
    klass: str | None,
    *,
    node: str | None = None,
    held: list[int] | None = None,
    owner: tuple[str, str] | None = None,
    tier: str | None = None,
    guaranteed: bool = False,
    scheduler: str = "tidal-scheduler",
) -> dict[str, Any]:
    """A pod of PriorityClass tidal-``klass`` (None: no PriorityClass), owned through the
    tidal.dev label ``owner`` = (label, workload)."""
    labels = {f"tidal.dev/{owner[0]}": owner[1]} if owner else {}
    priority = {"online": ONLINE, "batch": BATCH}.get(klass or "", 0)
    obj = pod(name, gpus, node=node, held=held, priority=priority, labels=labels)
    obj["spec"]["schedulerName"] = scheduler
    if klass:
        obj["spec"]["priorityClassName"] = f"tidal-{klass}"
    if tier:
        obj["metadata"]["annotations"]["tidal.dev/topology-tier"] = tier
    if guaranteed:
        obj["metadata"]["annotations"]["tidal.dev/topology-mode"] = "guaranteed"
    return obj


def reserved_for(obj: dict[str, Any], node: str, gpus: list[int], victims: list[str]) -> None:
    """Give a pending pod the reservation condition a preemption leaves on it."""
    record = ReservationRecord(node, tuple(gpus), tuple(victims), STARTED + 10**6)
    condition = {"type": "tidal.dev/reservation", "status": "True", "message": record.to_message()}
    obj["status"]["conditions"] = [condition]


def lines(extender: Extender, name: str) -> list[str]:
    """The exposition's sample lines of metric ``name`` (a histogram's buckets, sum and count
    included), in order."""
    text = generate_latest(extender.metrics.registry).decode()
    names = (name, f"{name}_bucket", f"{name}_sum", f"{name}_count")
    return [line for line in text.splitlines() if line.partition("{")[0].split(" ")[0] in names]


def new_extender(
    *nodes: str, now: float = STARTED + 3600
) -> tuple[Extender, FakeCluster, list[float]]:
    clock = [now]
    cache = ClusterCache(clock=lambda: clock[0])
    cache.replace("nodes", [gpu_node(n, "dgx1-v100") for n in nodes])
    cache.replace("pdbs", [])
    fake = FakeCluster(cache)
    return Extender(cache, fake, ExtenderSettings(reservation_ttl_s=600)), fake, clock


@pytest.fixture
def pool() -> tuple[Extender, FakeCluster]:
    """Node n: a batch worker on 0,1, a pod of no tidal class on 2, GPU 3 unhealthy, a replica
    on 4-7. Node m: a preemptor's reservation on 0-3 (its victim still on 0,1), 4-7 free."""
    extender, fake, _ = new_extender("m", "n")
    cache = extender.cache
    cache.upsert_topology(with_health(published("n", "dgx1-v100"), "0,1,2,4,5,6,7"))
    cache.upsert_topology(with_health(published("m", "dgx1-v100"), "0,1,2,3,4,5,6,7"))
    job = ("llmbatchjob", "job")
    fake.add(tidal_pod("job-0-1", 2, "batch", node="n", held=[0, 1], owner=job, tier="nvlink"))
    fake.add(tidal_pod("misc", 1, None, node="n", held=[2]))
    chat = ("llmservice", "chat")
    fake.add(
        tidal_pod("chat-0", 4, "online", node="n", held=[4, 5, 6, 7], owner=chat, tier="nvlink")
    )
    fake.add(tidal_pod("job-1-1", 2, "batch", node="m", held=[0, 1], owner=job))
    preemptor = tidal_pod("chat-1", 4, "online", owner=chat, tier="nvlink")
    reserved_for(preemptor, "m", [0, 1, 2, 3], ["uid-job-1-1"])
    fake.add(preemptor)
    return extender, fake


def test_every_gpu_has_its_state(pool: Any) -> None:
    extender, _ = pool
    # n: batch, batch, online (no tidal class counts as online), unhealthy, online x4
    # m: reserved x4 (a victim still runs on 0 and 1), free x4
    states = {"m": [3, 3, 3, 3, 0, 0, 0, 0], "n": [1, 1, 2, 4, 2, 2, 2, 2]}
    assert lines(extender, "tidal_gpu_state") == [
        f'tidal_gpu_state{{gpu="{gpu}",node="{node}"}} {value}.0'
        for node, values in states.items()
        for gpu, value in enumerate(values)
    ]


def test_every_held_or_reserved_gpu_names_its_pod_workload_class_and_tier(pool: Any) -> None:
    extender, _ = pool

    def info(node: str, gpu: int, klass: str, pod_name: str, tier: str, workload: str) -> str:
        return (
            f'tidal_gpu_allocation_info{{class="{klass}",gpu="{gpu}",namespace="ns",'
            f'node="{node}",pod="{pod_name}",tier="{tier}",workload="{workload}"}} 1.0'
        )

    assert lines(extender, "tidal_gpu_allocation_info") == [
        *(info("m", g, "online", "chat-1", "nvlink", "chat") for g in (0, 1, 2, 3)),
        *(info("n", g, "batch", "job-0-1", "nvlink", "job") for g in (0, 1)),
        info("n", 2, "other", "misc", "", "misc"),  # no owner label: the pod's own name
        # GPU 3 is unhealthy and nobody's: no series
        *(info("n", g, "online", "chat-0", "nvlink", "chat") for g in (4, 5, 6, 7)),
    ]


def test_pool_counts_and_intact_capacity(pool: Any) -> None:
    extender, _ = pool
    assert lines(extender, "tidal_pool_gpus") == [
        'tidal_pool_gpus{state="free"} 4.0',
        'tidal_pool_gpus{state="batch"} 2.0',
        'tidal_pool_gpus{state="online"} 5.0',
        'tidal_pool_gpus{state="reserved"} 4.0',
        'tidal_pool_gpus{state="unhealthy"} 1.0',
    ]
    # The DGX-1V's tier domains: its NVLink quads (16 each), the cross-quad NVLink pairs
    # {i, i+4} (4 each) and the node (64): 112 a node. Free: m's quad {4-7} (16); n nothing.
    assert lines(extender, "tidal_pool_intact_capacity_ratio") == [
        f"tidal_pool_intact_capacity_ratio {16 / 224}"
    ]


def test_an_empty_pool_is_all_intact_and_an_extender_without_nodes_exports_no_gpu() -> None:
    extender, _, _ = new_extender("a", "b")
    assert lines(extender, "tidal_pool_intact_capacity_ratio") == [
        "tidal_pool_intact_capacity_ratio 1.0"
    ]
    bare, _, _ = new_extender()
    assert lines(bare, "tidal_gpu_state") == []
    assert lines(bare, "tidal_pool_intact_capacity_ratio") == [
        "tidal_pool_intact_capacity_ratio 0.0"
    ]


def test_series_go_with_their_pod_and_node(pool: Any) -> None:
    extender, fake = pool
    cache = extender.cache
    cache.delete_pod("uid-misc")
    assert 'tidal_gpu_state{gpu="2",node="n"} 0.0' in lines(extender, "tidal_gpu_state")
    assert not any('pod="misc"' in line for line in lines(extender, "tidal_gpu_allocation_info"))
    # The victim goes and the preemptor is bound on its GPUs: held, no longer reserved.
    cache.delete_pod("uid-job-1-1")
    chat = ("llmservice", "chat")
    fake.add(tidal_pod("chat-1", 4, "online", node="m", held=[0, 1, 2, 3], owner=chat))
    assert lines(extender, "tidal_gpu_state")[:4] == [
        f'tidal_gpu_state{{gpu="{g}",node="m"}} 2.0' for g in range(4)
    ]
    cache.delete_node("m")
    assert not any('node="m"' in line for line in lines(extender, "tidal_gpu_state"))
    assert not any('node="m"' in line for line in lines(extender, "tidal_gpu_allocation_info"))
    assert 'tidal_pool_gpus{state="reserved"} 0.0' in lines(extender, "tidal_pool_gpus")
    assert 'tidal_pool_gpus{state="free"} 1.0' in lines(extender, "tidal_pool_gpus")


def test_a_preemption_counts_its_classes_victim_gpus_waste_and_lost_work() -> None:
    """Every GPU of cube-a busy; a 2-GPU batch pod straddles the quads on 3,4, so either quad
    frees 5 GPUs for 4: one wasted. Victims started an hour ago with no checkpoint."""
    extender, fake, _ = new_extender("cube-a")
    fake.add(tidal_pod("wide", 2, "batch", node="cube-a", held=[3, 4]))
    for gpu in (0, 1, 2, 5, 6, 7):
        fake.add(tidal_pod(f"b{gpu}", 1, "batch", node="cube-a", held=[gpu]))
    preemptor = fake.add(tidal_pod("tp4", 4, "online", guaranteed=True))
    proposed = {"cube-a": {"Pods": [{"UID": p["metadata"]["uid"]} for p in fake.pods.values()]}}
    result = extender.preempt(parse_preempt({"Pod": preemptor, "NodeNameToMetaVictims": proposed}))
    assert len(result["NodeNameToMetaVictims"]["cube-a"]["Pods"]) == 4
    assert lines(extender, "tidal_extender_preemptions_total") == [
        'tidal_extender_preemptions_total{preemptor_class="online",tier="nvlink"} 1.0'
    ]
    assert lines(extender, "tidal_extender_victims_total") == ["tidal_extender_victims_total 4.0"]
    assert lines(extender, "tidal_extender_preemption_victim_gpus_total") == [
        'tidal_extender_preemption_victim_gpus_total{victim_class="batch"} 5.0'
    ]
    assert lines(extender, "tidal_extender_preemption_wasted_gpus_total") == [
        "tidal_extender_preemption_wasted_gpus_total 1.0"
    ]
    # 5 GPUs x 3600 s since the victims started
    assert lines(extender, "tidal_extender_preemption_lost_gpu_seconds_total") == [
        "tidal_extender_preemption_lost_gpu_seconds_total 18000.0"
    ]
    # While it waits for its victims, the preemptor is pending: not yet filtered.
    assert 'tidal_extender_pending_pods{reason="unfiltered"} 1.0' in lines(
        extender, "tidal_extender_pending_pods"
    )


def test_a_bind_counts_its_mode_and_requested_and_achieved_tiers() -> None:
    """Best-effort asks for an NVLink quad; with 2,3,6,7 the only free GPUs the set it gets
    spans the node. Guaranteed gets its quad on the other node."""
    extender, fake, _ = new_extender("cube-a", "cube-b")
    for gpu in (0, 1, 4, 5):
        fake.add(tidal_pod(f"b{gpu}", 1, "batch", node="cube-a", held=[gpu]))
    fake.add(tidal_pod("busy-b", 4, "batch", node="cube-b", held=[0, 1, 2, 3]))
    loose = fake.add(tidal_pod("loose", 4, "batch"))
    assert extender.filter(filter_args(loose, ["cube-a"]))["NodeNames"] == ["cube-a"]
    assert extender.bind(BindArgs("loose", "ns", "uid-loose", "cube-a")) == {"Error": ""}
    strict = fake.add(tidal_pod("strict", 4, "online", guaranteed=True))
    assert extender.filter(filter_args(strict, ["cube-b"]))["NodeNames"] == ["cube-b"]
    assert extender.bind(BindArgs("strict", "ns", "uid-strict", "cube-b")) == {"Error": ""}
    assert fake.pods["loose"]["metadata"]["annotations"]["tidal.dev/topology-achieved"] == "node"
    assert lines(extender, "tidal_extender_binds_total") == [
        "tidal_extender_binds_total"
        '{achieved_tier="node",mode="best-effort",requested_tier="nvlink"} 1.0',
        "tidal_extender_binds_total"
        '{achieved_tier="nvlink",mode="guaranteed",requested_tier="nvlink"} 1.0',
    ]
    # Neither waited for a preemption.
    assert lines(extender, "tidal_extender_preemptor_wait_seconds_count") == [
        "tidal_extender_preemptor_wait_seconds_count 0.0"
    ]


def pending(extender: Extender) -> dict[str, float]:
    out = {}
    for line in lines(extender, "tidal_extender_pending_pods"):
        labels, value = line.rsplit(" ", 1)
        out[labels.split('"')[1]] = float(value)
    return {reason: value for reason, value in out.items() if value}


def test_pending_pods_by_their_last_filter_outcome() -> None:
    extender, fake, _ = new_extender("cube-a")
    fake.add(tidal_pod("hog", 6, "online", node="cube-a", held=[0, 1, 2, 3, 4, 5]))
    unseen = fake.add(tidal_pod("unseen", 1, "batch"))
    fits = fake.add(tidal_pod("fits", 2, "batch"))
    stuck = fake.add(tidal_pod("stuck", 4, "batch", guaranteed=True))
    fake.add(tidal_pod("elsewhere", 1, "batch", scheduler="default-scheduler"))  # not tidal's
    assert pending(extender) == {"unfiltered": 3.0}
    assert extender.filter(filter_args(fits, ["cube-a"]))["NodeNames"] == ["cube-a"]
    # A batch pod may not preempt the online one: no plan.
    assert extender.filter(filter_args(stuck, ["cube-a"]))["NodeNames"] == []
    assert pending(extender) == {"unfiltered": 1.0, "fits": 1.0, "no-plan": 1.0}
    extender.bind(BindArgs("fits", "ns", "uid-fits", "cube-a"))
    fake.cache.delete_pod(stuck["metadata"]["uid"])
    assert pending(extender) == {"unfiltered": 1.0}
    assert unseen["metadata"]["uid"] in fake.cache.pending
    every = [line.split('"')[1] for line in lines(extender, "tidal_extender_pending_pods")]
    assert every == [
        "fits",
        "reserved",
        "waiting",
        "evict",
        "evict-failed",
        "preempt-verb",
        "no-plan",
        "refused",
        "unfiltered",
    ]


def test_a_preemptors_wait_runs_from_its_first_failed_filter_to_its_bind() -> None:
    extender, fake, clock = new_extender("cube-a")
    for i, gpu in enumerate((0, 1, 4, 5)):
        fake.add(tidal_pod(f"b{i}", 1, "batch", node="cube-a", held=[gpu]))
    preemptor = fake.add(tidal_pod("tp4", 4, "online", guaranteed=True))
    assert extender.filter(filter_args(preemptor, ["cube-a"]))["NodeNames"] == []  # evicts
    assert pending(extender) == {"evict": 1.0}
    clock[0] += 30
    assert extender.filter(filter_args(preemptor, ["cube-a"]))["NodeNames"] == []
    assert pending(extender) == {"waiting": 1.0}
    clock[0] += 12
    fake.finish_evictions()
    assert extender.filter(filter_args(preemptor, ["cube-a"]))["NodeNames"] == ["cube-a"]
    assert pending(extender) == {"reserved": 1.0}
    assert extender.bind(BindArgs("tp4", "ns", "uid-tp4", "cube-a")) == {"Error": ""}
    assert pending(extender) == {}
    histogram = lines(extender, "tidal_extender_preemptor_wait_seconds")
    assert 'tidal_extender_preemptor_wait_seconds_bucket{le="30.0"} 0.0' in histogram
    assert 'tidal_extender_preemptor_wait_seconds_bucket{le="60.0"} 1.0' in histogram
    assert "tidal_extender_preemptor_wait_seconds_sum 42.0" in histogram
    assert "tidal_extender_preemptor_wait_seconds_count 1.0" in histogram


def test_cache_apply_failures_start_at_zero_for_every_watched_kind() -> None:
    """An alert on the gauge has a series from the start, not only after a first bug."""
    extender, _, _ = new_extender("n")
    extender.metrics.export_cache(extender.stats(), extender.cache.apply_failures, WATCHED_KINDS)
    assert lines(extender, "tidal_extender_cache_apply_failures") == [
        f'tidal_extender_cache_apply_failures{{kind="{kind}"}} 0.0' for kind in WATCHED_KINDS
    ]
    assert set(WATCHED_KINDS) == set(extender.cache._kinds())  # one per reflector's handlers

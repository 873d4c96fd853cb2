"""Prometheus metrics of the extender, on a registry of its own.

Two kinds: what the extender does (``tidal_extender_*`` counters and histograms, updated as it
acts), and what its cache holds (``tidal_gpu_state``, ``tidal_gpu_allocation_info``,
``tidal_pool_*``, ``tidal_extender_pending_pods``), computed at scrape time by
:class:`CacheCollector` from one view of the cache, so they are always consistent with each
other and a GPU, pod or node that goes takes its series with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from tidal.scheduler_extender.pool import NodeGpus, intact_capacity_ratio, state_counts

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# A preemptor waits for its victims' grace periods (a batch worker's is 120 s) and a retry.
_WAIT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)
GPU_STATE_HELP = (
    "State of every GPU of every node the extender knows: 0 free, 1 batch (held by a pod of "
    "PriorityClass tidal-batch), 2 online (held by any other pod: tidal-online or a "
    "PriorityClass not tidal's), 3 reserved (for a preemptor's plan, even while a victim "
    "still runs on it), 4 unhealthy (its node agent says so, whoever holds it)."
)


@dataclass(frozen=True)
class PreemptionFacts:
    """What one preemption plan carried out costs, as the metrics count it."""

    preemptor_class: str  # online | batch | other
    tier: str  # the topology tier the preemptor asked for
    victim_gpus: Mapping[str, int]  # victims' class -> GPUs they held
    victims: int
    wasted_gpus: int  # GPUs freed that the preemptor does not use
    lost_gpu_seconds: float  # victims' GPUs x seconds since their last checkpoint or start


@dataclass(frozen=True)
class CacheView:
    """What the cache collector exports: the GPU pool and the pending pods by reason."""

    pool: Sequence[NodeGpus] = ()
    pending: Mapping[str, int] = field(default_factory=dict)


class CacheCollector:
    """``tidal_gpu_*``, ``tidal_pool_*`` and ``tidal_extender_pending_pods`` from a fresh
    :class:`CacheView` each scrape (``source``, set by the Extender; nothing before)."""

    def __init__(self) -> None:
        self.source: Callable[[], CacheView] | None = None

    def describe(self) -> Iterator[Metric]:
        return _cache_families(CacheView())

    def collect(self) -> Iterator[Metric]:
        return _cache_families(self.source() if self.source is not None else CacheView())


def _cache_families(view: CacheView) -> Iterator[Metric]:
    state = GaugeMetricFamily("tidal_gpu_state", GPU_STATE_HELP, labels=["node", "gpu"])
    info = GaugeMetricFamily(
        "tidal_gpu_allocation_info",
        "A GPU held by a pod, or reserved for a preemptor (always 1; one series per such "
        "GPU, the holder of tidal_gpu_state's state): the pod, its workload (the owning "
        "LLMService or LLMBatchJob, else the pod's name), its class (online, batch, other: its "
        "PriorityClass) and the topology tier it asked for (empty without one).",
        labels=["node", "gpu", "namespace", "pod", "workload", "class", "tier"],
    )
    for node in view.pool:
        for gpu, (value, holder) in enumerate(zip(node.states, node.holders, strict=True)):
            state.add_metric([node.node, str(gpu)], int(value))
            if holder is not None:
                labels = [holder.namespace, holder.pod, holder.workload, holder.klass, holder.tier]
                info.add_metric([node.node, str(gpu), *labels], 1)
    yield state
    yield info
    counts = GaugeMetricFamily(
        "tidal_pool_gpus",
        "GPUs of the pool per tidal_gpu_state state (free, batch, online, reserved, unhealthy).",
        labels=["state"],
    )
    for gpu_state, count in state_counts(view.pool).items():
        counts.add_metric([gpu_state.label], count)
    yield counts
    yield GaugeMetricFamily(
        "tidal_pool_intact_capacity_ratio",
        "Intact aligned capacity of the free GPUs as a share of an empty pool's (the "
        "simulator's M9): the sum over nodes of |d|^2 for every topology domain d (NVLink "
        "clique, PCIe switch, NUMA node, socket, node) whose GPUs are all free, over the same "
        "sum with every GPU free. 1 when all is free; falls as GPUs are held and as free ones "
        "scatter. Reserved and unhealthy GPUs are not free.",
        value=intact_capacity_ratio(view.pool),
    )
    pending = GaugeMetricFamily(
        "tidal_extender_pending_pods",
        "Unbound GPU pods for tidal-scheduler, by the outcome of their last filter call "
        "(tidal_extender_decisions_total's filter outcomes; unfiltered: no filter call seen "
        "since the extender started, e.g. kube-scheduler's own filters passed no node).",
        labels=["reason"],
    )
    for reason, count in view.pending.items():
        pending.add_metric([reason], count)
    yield pending


class ExtenderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "tidal_extender_verb_duration_seconds",
            "Time to answer one extender call, by verb.",
            ["verb"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "tidal_extender_decisions",
            "Extender decisions by verb and outcome.",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.preemptions = Counter(
            "tidal_extender_preemptions",
            "Preemption plans carried out (GPUs reserved for a preemptor, victims chosen), by "
            "the preemptor's class (online, batch, other: its PriorityClass) and the topology "
            "tier it asked for.",
            ["preemptor_class", "tier"],
            registry=self.registry,
        )
        self.victims = Counter(
            "tidal_extender_victims", "Pods chosen as preemption victims.", registry=self.registry
        )
        self.victim_gpus = Counter(
            "tidal_extender_preemption_victim_gpus",
            "GPUs held by the pods chosen as preemption victims, by the victims' class.",
            ["victim_class"],
            registry=self.registry,
        )
        self.wasted_gpus = Counter(
            "tidal_extender_preemption_wasted_gpus",
            "GPUs preemptions free that their preemptor does not use (its victims' GPUs "
            "outside the set it takes).",
            registry=self.registry,
        )
        self.lost_gpu_seconds = Counter(
            "tidal_extender_preemption_lost_gpu_seconds",
            "Work preemptions throw away, as the planner weighs it: each victim's GPUs times "
            "the seconds since its last checkpoint (due by its "
            "tidal.dev/checkpoint-interval-seconds), or since its start without one.",
            registry=self.registry,
        )
        self.binds = Counter(
            "tidal_extender_binds",
            "Pods bound, by topology mode (guaranteed, best-effort, none), the tier asked "
            "for, and the tier the bound GPUs achieve (the tier of their weakest pair, from "
            "the node's topology).",
            ["mode", "requested_tier", "achieved_tier"],
            registry=self.registry,
        )
        self.preemptor_wait = Histogram(
            "tidal_extender_preemptor_wait_seconds",
            "Time from a preemptor's first failed filter (or preempt call) to its bind, for "
            "pods the extender reserved GPUs for.",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.bad_requests = Counter(
            "tidal_extender_bad_requests",
            "Malformed requests answered with 400.",
            ["verb"],
            registry=self.registry,
        )
        self.cache_size = Gauge(
            "tidal_extender_cache_objects",
            "Objects in the extender's cluster cache.",
            ["kind"],
            registry=self.registry,
        )
        self.object_problems = Counter(
            "tidal_extender_object_problems",
            "Fields of watched objects the extender could not read (left at a safe default).",
            ["kind", "field"],
            registry=self.registry,
        )
        self.apply_failures = Gauge(
            "tidal_extender_cache_apply_failures",
            "Cache changes that raised, by kind, since start (a bug if not 0).",
            ["kind"],
            registry=self.registry,
        )
        self.cache = CacheCollector()
        self.registry.register(self.cache)

    def export_cache(
        self, stats: dict[str, int], failures: dict[str, int], kinds: Iterable[str] = ()
    ) -> None:
        """``kinds``: the kinds the cache watches, exported at 0 until a change of theirs
        raises, so an alert on the series has something to compare from the start."""
        for kind, value in stats.items():
            self.cache_size.labels(kind).set(value)
        for kind in kinds:
            self.apply_failures.labels(kind).set(failures.get(kind, 0))
        for kind, value in failures.items():
            self.apply_failures.labels(kind).set(value)

    def object_problem(self, kind: str, field: str) -> None:
        self.object_problems.labels(kind, field_label(field)).inc()

    def decision(self, verb: str, outcome: str) -> None:
        self.decisions.labels(verb, outcome).inc()

    def preemption(self, facts: PreemptionFacts) -> None:
        self.preemptions.labels(facts.preemptor_class, facts.tier).inc()
        self.victims.inc(facts.victims)
        for victim_class, gpus in facts.victim_gpus.items():
            self.victim_gpus.labels(victim_class).inc(gpus)
        self.wasted_gpus.inc(facts.wasted_gpus)
        self.lost_gpu_seconds.inc(facts.lost_gpu_seconds)

    def bound(self, mode: str, requested_tier: str, achieved_tier: str) -> None:
        self.binds.labels(mode, requested_tier, achieved_tier).inc()


_INDEX = re.compile(r"\[\d+\]")


def field_label(field: str) -> str:
    """A field path as a label of bounded cardinality: list indices and resource names go
    (``spec.containers[3].resources.limits.x`` -> ``spec.containers[].resources``); annotation
    keys stay (they are a fixed set of tidal's own)."""
    label = _INDEX.sub("[]", field)
    head, sep, _ = label.partition(".resources.")
    return head + ".resources" if sep else label

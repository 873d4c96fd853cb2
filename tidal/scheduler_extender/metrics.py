"""Prometheus metrics of the extender (prefix ``tidal_extender_``), on a registry of its own."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


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
            "tidal_extender_preemptions", "Preemption plans carried out.", registry=self.registry
        )
        self.victims = Counter(
            "tidal_extender_victims", "Pods chosen as preemption victims.", registry=self.registry
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

    def export_cache(self, stats: dict[str, int], failures: dict[str, int]) -> None:
        for kind, value in stats.items():
            self.cache_size.labels(kind).set(value)
        for kind, value in failures.items():
            self.apply_failures.labels(kind).set(value)

    def object_problem(self, kind: str, field: str) -> None:
        self.object_problems.labels(kind, field_label(field)).inc()

    def decision(self, verb: str, outcome: str) -> None:
        self.decisions.labels(verb, outcome).inc()

    def preemption(self, victims: int) -> None:
        self.preemptions.inc()
        self.victims.inc(victims)


_INDEX = re.compile(r"\[\d+\]")


def field_label(field: str) -> str:
    """A field path as a label of bounded cardinality: list indices and resource names go
    (``spec.containers[3].resources.limits.x`` -> ``spec.containers[].resources``); annotation
    keys stay (they are a fixed set of tidal's own)."""
    label = _INDEX.sub("[]", field)
    head, sep, _ = label.partition(".resources.")
    return head + ".resources" if sep else label

"""Prometheus metrics of the node agent: ``tidal_gpu_*`` per GPU, and the agent's own.

Every series carries a ``node`` label (this agent's node), so a dashboard can join GPUs by
(node, gpu) with no relabelling in the scrape configuration: a PodMonitor's target labels name
the pod, not its node.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from tidal.node_agent.facts import GpuSample, NodeFacts

GPU_LABELS = ("gpu", "node")


class AgentMetrics:
    def __init__(self, node: str = "") -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "tidal_gpu_info",
            "A GPU of this node (always 1), with its identity as labels.",
            [*GPU_LABELS, "uuid", "model", "pci_bus_id", "numa_node"],
            registry=r,
        )
        self.healthy = Gauge(
            "tidal_gpu_healthy", "1 when the GPU is healthy.", GPU_LABELS, registry=r
        )
        self.utilization = Gauge(
            "tidal_gpu_utilization_ratio", "Share of time a kernel ran.", GPU_LABELS, registry=r
        )
        self.memory_used = Gauge(
            "tidal_gpu_memory_used_bytes", "Device memory in use.", GPU_LABELS, registry=r
        )
        self.memory_total = Gauge(
            "tidal_gpu_memory_total_bytes", "Device memory.", GPU_LABELS, registry=r
        )
        self.temperature = Gauge(
            "tidal_gpu_temperature_celsius", "GPU temperature.", GPU_LABELS, registry=r
        )
        self.power = Gauge("tidal_gpu_power_watts", "GPU power draw.", GPU_LABELS, registry=r)
        # Bound to this node once: callers set it as an unlabelled gauge.
        self.heartbeat = Gauge(
            "tidal_gpu_topology_heartbeat_timestamp_seconds",
            "When the agent last wrote its GPUTopology status.",
            ["node"],
            registry=r,
        ).labels(node)
        self._allocations = Counter(
            "tidal_gpu_allocations_total",
            "Device plugin Allocate calls by outcome (tidal: the pod's annotated GPUs; "
            "untracked: a pod scheduled without tidal; refused: a mismatch).",
            ["outcome", "node"],
            registry=r,
        )

    def allocation(self, outcome: str) -> None:
        """Count one Allocate call that ended in ``outcome``."""
        self._allocations.labels(outcome, self.node).inc()

    def describe(self, facts: NodeFacts) -> None:
        for gpu in facts.gpus:
            index = str(gpu.index)
            identity = (gpu.uuid, gpu.name, gpu.pci_bus_id, str(gpu.numa_node))
            self.info.labels(index, self.node, *identity).set(1)
            self.memory_total.labels(index, self.node).set(gpu.memory_mib * 2**20)

    def observe(self, samples: Sequence[GpuSample]) -> None:
        for s in samples:
            gpu = (str(s.index), self.node)
            self.healthy.labels(*gpu).set(1 if s.healthy else 0)
            self.utilization.labels(*gpu).set(s.utilization)
            self.memory_used.labels(*gpu).set(s.memory_used_mib * 2**20)
            if s.temperature_c is not None:
                self.temperature.labels(*gpu).set(s.temperature_c)
            if s.power_w is not None:
                self.power.labels(*gpu).set(s.power_w)

"""Prometheus metrics of the node agent: ``tidal_gpu_*`` per GPU, and the agent's own."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from tidal.node_agent.facts import GpuSample, NodeFacts


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "tidal_gpu_info",
            "A GPU of this node (always 1), with its identity as labels.",
            ["gpu", "uuid", "model", "pci_bus_id", "numa_node"],
            registry=r,
        )
        self.healthy = Gauge("tidal_gpu_healthy", "1 when the GPU is healthy.", ["gpu"], registry=r)
        self.utilization = Gauge(
            "tidal_gpu_utilization_ratio", "Share of time a kernel ran.", ["gpu"], registry=r
        )
        self.memory_used = Gauge(
            "tidal_gpu_memory_used_bytes", "Device memory in use.", ["gpu"], registry=r
        )
        self.memory_total = Gauge(
            "tidal_gpu_memory_total_bytes", "Device memory.", ["gpu"], registry=r
        )
        self.temperature = Gauge(
            "tidal_gpu_temperature_celsius", "GPU temperature.", ["gpu"], registry=r
        )
        self.power = Gauge("tidal_gpu_power_watts", "GPU power draw.", ["gpu"], registry=r)
        self.heartbeat = Gauge(
            "tidal_gpu_topology_heartbeat_timestamp_seconds",
            "When the agent last wrote its GPUTopology status.",
            registry=r,
        )
        self.allocations = Counter(
            "tidal_gpu_allocations_total",
            "Device plugin Allocate calls by outcome (tidal: the pod's annotated GPUs; "
            "untracked: a pod scheduled without tidal; refused: a mismatch).",
            ["outcome"],
            registry=r,
        )

    def describe(self, facts: NodeFacts) -> None:
        for gpu in facts.gpus:
            labels = (str(gpu.index), gpu.uuid, gpu.name, gpu.pci_bus_id, str(gpu.numa_node))
            self.info.labels(*labels).set(1)
            self.memory_total.labels(str(gpu.index)).set(gpu.memory_mib * 2**20)

    def observe(self, samples: Sequence[GpuSample]) -> None:
        for s in samples:
            gpu = str(s.index)
            self.healthy.labels(gpu).set(1 if s.healthy else 0)
            self.utilization.labels(gpu).set(s.utilization)
            self.memory_used.labels(gpu).set(s.memory_used_mib * 2**20)
            if s.temperature_c is not None:
                self.temperature.labels(gpu).set(s.temperature_c)
            if s.power_w is not None:
                self.power.labels(gpu).set(s.power_w)

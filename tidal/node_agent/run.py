"""The node agent process: discover, publish, serve the device plugin, report health."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import start_http_server

from tidal.kubeclient import KubeApiError
from tidal.node_agent.backend import open_backend
from tidal.node_agent.deviceplugin.server import (
    DevicePluginServer,
    GpuDevicePlugin,
    PluginOptions,
)
from tidal.node_agent.facts import GpuBackend, GpuSample
from tidal.node_agent.kube import KubePods
from tidal.node_agent.metrics import AgentMetrics
from tidal.node_agent.publish import Discovery, Publisher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    node: str
    kubeconfig: Path | None = None
    fake: str | None = None
    fixture: Path | None = None
    fake_health: Path | None = None
    device_plugin: bool = True
    plugin: PluginOptions = field(default_factory=PluginOptions)
    metrics_port: int = 9402  # 0: no metrics server
    heartbeat_s: float = 30.0
    health_interval_s: float = 5.0
    rediscover_s: float = 300.0


class NodeAgent:
    def __init__(self, options: AgentOptions) -> None:
        from tidal.kubeclient import api_client  # noqa: PLC0415

        self.options = options
        self.backend: GpuBackend = open_backend(
            options.node, options.fake, options.fixture, options.fake_health
        )
        self.discovery = Discovery.of(options.node, self.backend.facts())
        self.metrics = AgentMetrics(options.node)
        self.metrics.describe(self.discovery.facts)
        self.api = api_client(options.kubeconfig)
        self.publisher = Publisher(self.api)
        self.plugin = GpuDevicePlugin(
            self.discovery, KubePods(self.api, options.node), self.metrics
        )
        self.server: DevicePluginServer | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        """Until SIGTERM/SIGINT or :meth:`stop`."""
        if self.options.metrics_port:
            start_http_server(self.options.metrics_port, registry=self.metrics.registry)
        self._publish_until_done()
        if self.options.device_plugin:
            self.server = DevicePluginServer(self.plugin, self.options.plugin)
            self.server.start()
        try:
            self._loop()
        finally:
            if self.server is not None:
                self.server.stop()
            self.backend.close()

    def stop(self) -> None:
        self.stop_event.set()

    def _publish_until_done(self) -> None:
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                self.publisher.publish(self.discovery)
                log.info(
                    "published GPUTopology %s: %d GPUs, preset %s, class %s",
                    self.options.node,
                    len(self.discovery.facts.gpus),
                    self.discovery.preset or "none",
                    self.discovery.topology_class,
                )
                return
            except KubeApiError as error:
                log.error("%s; retrying in %.0f s", error, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _loop(self) -> None:
        last_beat = last_discovery = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            samples = self.backend.sample()
            self.metrics.observe(samples)
            beat_due = now - last_beat >= self.options.heartbeat_s
            if self.plugin.health_changed(samples) or beat_due:
                self.plugin.update_health(samples)
                self._heartbeat(samples)
                last_beat = now
            if now - last_discovery >= self.options.rediscover_s:
                self._rediscover()
                last_discovery = now
            self.stop_event.wait(self.options.health_interval_s)

    def _heartbeat(self, samples: list[GpuSample]) -> None:
        try:
            self.publisher.heartbeat(self.discovery, samples)
            self.metrics.heartbeat.set_to_current_time()
        except KubeApiError as error:
            log.error("heartbeat: %s", error)

    def _rediscover(self) -> None:
        """Facts change rarely (a GPU falls off the bus, a driver update): republish then."""
        fresh = Discovery.of(self.options.node, self.backend.facts())
        if fresh.spec != self.discovery.spec:
            log.warning("the GPU topology of %s changed; republishing", self.options.node)
            self.discovery = self.plugin.discovery = fresh
            self._publish_until_done()


def run_agent(options: AgentOptions) -> None:
    agent = NodeAgent(options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()

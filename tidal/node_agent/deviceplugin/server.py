"""The kubelet device plugin (API v1beta1, gRPC over a unix socket) for ``nvidia.com/gpu``.

Devices are GPUs, identified by UUID. GetPreferredAllocation answers with the GPUs the extender
wrote on the pod being admitted; Allocate hands a container exactly those GPUs (environment and
device nodes) or fails with a message naming the pod and both GPU sets. The plugin re-registers
when the kubelet restarts (which deletes every socket in the device plugin directory).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from tidal.api import GPU_RESOURCE
from tidal.node_agent.allocation import (
    AllocationError,
    PendingAssignment,
    container_env,
    device_paths,
    match_allocation,
    preferred_allocation,
)
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2 as api
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2_grpc as rpc
from tidal.node_agent.facts import GpuSample
from tidal.node_agent.metrics import AgentMetrics
from tidal.node_agent.publish import Discovery

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
DEFAULT_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"


class PodSource(Protocol):
    """Pods bound to this node that wait to start, with their ``tidal.dev/gpus``."""

    def waiting(self) -> list[PendingAssignment]: ...


@dataclass(frozen=True)
class PluginOptions:
    directory: Path = DEFAULT_DIR
    resource: str = GPU_RESOURCE
    endpoint: str = "tidal-gpu.sock"
    watch_interval_s: float = 1.0


class GpuDevicePlugin(rpc.DevicePluginServicer):
    def __init__(
        self, discovery: Discovery, pods: PodSource, metrics: AgentMetrics | None = None
    ) -> None:
        self.discovery = discovery
        self.pods = pods
        self.metrics = metrics or AgentMetrics(discovery.node)
        facts = discovery.facts
        self.index_of = {g.uuid: g.index for g in facts.gpus}
        self._health = {g.index: True for g in facts.gpus}
        self._changed = threading.Condition()
        self._generation = 0
        self._stopping = False
        self._allocated: set[str] = set()  # pod UIDs handed their GPUs (kubelet admits once)
        self._lock = threading.Lock()

    # -- health ------------------------------------------------------------------------------
    def health_changed(self, samples: list[GpuSample]) -> bool:
        with self._changed:
            return {s.index: s.healthy for s in samples} != self._health

    def update_health(self, samples: list[GpuSample]) -> None:
        """Stream a new device list to the kubelet when any GPU's health changed."""
        health = {s.index: s.healthy for s in samples}
        with self._changed:
            if health == self._health:
                return
            for sample in samples:
                if sample.healthy != self._health.get(sample.index):
                    state = "healthy" if sample.healthy else f"unhealthy: {sample.reason}"
                    log.warning("GPU %d is %s", sample.index, state)
            self._health = health
            self._generation += 1
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def devices(self) -> list[api.Device]:
        return [
            api.Device(
                ID=gpu.uuid,
                health=HEALTHY if self._health.get(gpu.index) else UNHEALTHY,
                topology=api.TopologyInfo(nodes=[api.NUMANode(ID=max(gpu.numa_node, 0))]),
            )
            for gpu in self.discovery.facts.gpus
        ]

    # -- the DevicePlugin service ------------------------------------------------------------
    def _news_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self._stopping or self._generation != seen

    def GetDevicePluginOptions(self, request: api.Empty, context: Any) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(self, request: api.Empty, context: Any) -> Iterator[api.ListAndWatchResponse]:
        seen = -1
        while True:
            with self._changed:
                self._changed.wait_for(self._news_since(seen), timeout=5.0)
                if self._stopping or not context.is_active():
                    return
                if self._generation == seen:
                    continue
                seen = self._generation
                devices = self.devices()
            yield api.ListAndWatchResponse(devices=devices)

    def GetPreferredAllocation(
        self, request: api.PreferredAllocationRequest, context: Any
    ) -> api.PreferredAllocationResponse:
        waiting = self._waiting(context)
        responses = []
        for container in request.container_requests:
            available = self._indices(container.available_deviceIDs, context)
            must = self._indices(container.must_include_deviceIDs, context)
            with self._lock:
                chosen = preferred_allocation(
                    self.discovery.shape,
                    available,
                    must,
                    container.allocation_size,
                    waiting,
                    self._allocated,
                )
            uuids = [self.discovery.facts.gpus[g].uuid for g in chosen]
            responses.append(api.ContainerPreferredAllocationResponse(deviceIDs=uuids))
        return api.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request: api.AllocateRequest, context: Any) -> api.AllocateResponse:
        waiting = self._waiting(context)
        responses = []
        for container in request.container_requests:
            gpus = sorted(self._indices(container.devices_ids, context))
            with self._lock:
                try:
                    owner = match_allocation(gpus, waiting, self._allocated)
                except AllocationError as error:
                    log.error("Allocate refused: %s", error)
                    self.metrics.allocation("refused")
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
                if owner is not None:
                    self._allocated.add(owner.uid)
            who = owner.key if owner else "a pod scheduled without tidal"
            self.metrics.allocation("tidal" if owner else "untracked")
            log.info("allocating GPUs %s to %s", gpus, who)
            responses.append(self._container_response(gpus))
        return api.AllocateResponse(container_responses=responses)

    def PreStartContainer(
        self, request: api.PreStartContainerRequest, context: Any
    ) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()

    # -- helpers -----------------------------------------------------------------------------
    def _waiting(self, context: Any) -> list[PendingAssignment]:
        try:
            return self.pods.waiting()
        except Exception as error:  # the API server is down: refuse rather than guess
            log.error("cannot list the pods waiting on this node: %s", error)
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot read which GPUs tidal assigned to the pods on this node: {error}",
            )
            raise  # unreachable: abort raises

    def _indices(self, ids: Any, context: Any) -> set[int]:
        unknown = [i for i in ids if i not in self.index_of]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown device IDs {unknown}")
        return {self.index_of[i] for i in ids}

    def _container_response(self, gpus: list[int]) -> api.ContainerAllocateResponse:
        d = self.discovery
        env = container_env(d.facts, d.topology, d.shape, gpus)
        devices = [
            api.DeviceSpec(container_path=path, host_path=path, permissions="rw")
            for path in device_paths(d.facts, gpus)
        ]
        return api.ContainerAllocateResponse(envs=env, devices=devices)


class DevicePluginServer:
    """Serves :class:`GpuDevicePlugin` on its socket, registers it with the kubelet, and starts
    over when the kubelet restarts."""

    def __init__(self, plugin: GpuDevicePlugin, options: PluginOptions = PluginOptions()) -> None:
        self.plugin = plugin
        self.options = options
        self.socket = options.directory / options.endpoint
        self.kubelet_socket = options.directory / KUBELET_SOCKET
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.registrations = 0

    def start(self) -> None:
        """Serve and register once (raises if the kubelet refuses), then keep watching."""
        self._serve()
        self._register()
        self._watcher = threading.Thread(target=self._watch, name="kubelet-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self.plugin.stop()
        if self._server is not None:
            self._server.stop(grace=1).wait()
        self.socket.unlink(missing_ok=True)
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _serve(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait()
        self.socket.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dp"))
        rpc.add_DevicePluginServicer_to_server(self.plugin, server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        log.info("device plugin serving %s on %s", self.options.resource, self.socket)

    def _register(self) -> None:
        request = api.RegisterRequest(
            version=API_VERSION,
            endpoint=self.options.endpoint,
            resource_name=self.options.resource,
            options=api.DevicePluginOptions(get_preferred_allocation_available=True),
        )
        with grpc.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            try:
                stub = rpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
                stub.Register(request, timeout=10)
            except grpc.RpcError as error:
                raise RegistrationError(
                    f"the kubelet at {self.kubelet_socket} refused or did not answer the "
                    f"registration of {self.options.resource}: {error.details()}"
                ) from error
        self.registrations += 1
        log.info("registered %s with the kubelet", self.options.resource)

    def _watch(self) -> None:
        """A kubelet restart removes our socket and makes a new kubelet.sock: start over."""
        kubelet = _inode(self.kubelet_socket)
        while not self._stop.wait(self.options.watch_interval_s):
            now = _inode(self.kubelet_socket)
            if self.socket.exists() and now == kubelet:
                continue
            if now is None:
                continue  # the kubelet is down; wait for its socket
            log.warning("kubelet restarted (socket changed): serving and registering again")
            try:
                self._serve()
                self._register()
                kubelet = now
            except (RegistrationError, RuntimeError) as error:
                log.error("%s; retrying", error)


class RegistrationError(RuntimeError):
    pass


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None

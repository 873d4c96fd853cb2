"""A stand-in for the kubelet's side of the device plugin API: its Registration service on
<dir>/kubelet.sock, and clients to the plugins that register (unit and e2e tests)."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from tidal.node_agent.deviceplugin.v1beta1 import api_pb2 as api
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2_grpc as rpc


class KubeletDouble(rpc.RegistrationServicer):
    """The kubelet's Registration service on <dir>/kubelet.sock; records what registered."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[api.RegisterRequest] = []
        self.registered = threading.Event()
        self.server: grpc.Server | None = None

    def Register(self, request: api.RegisterRequest, context: Any) -> api.Empty:
        self.requests.append(request)
        self.registered.set()
        return api.Empty()

    def start(self) -> None:
        sock = self.directory / "kubelet.sock"
        sock.unlink(missing_ok=True)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rpc.add_RegistrationServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.server.add_insecure_port(f"unix://{sock}")
        self.server.start()

    def restart(self) -> None:
        """What a kubelet restart does: stop, wipe every socket in the directory, serve again."""
        assert self.server is not None
        self.server.stop(0).wait()
        for sock in self.directory.glob("*.sock"):
            sock.unlink()
        self.registered.clear()
        self.start()

    def plugin(self, endpoint: str) -> Any:
        channel = grpc.insecure_channel(f"unix://{self.directory / endpoint}")
        return rpc.DevicePluginStub(channel)  # type: ignore[no-untyped-call]

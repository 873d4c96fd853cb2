"""The extender's listener, on a real uvicorn over loopback: who may connect (mutual TLS, and
no public address without it), and what idle, slow or too many connections get."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tests.test_extender import FakeCluster
from tidal.devcluster.certs import Pki, make_pki
from tidal.devcluster.process import free_port
from tidal.scheduler_extender import run
from tidal.scheduler_extender.cache import ClusterCache
from tidal.scheduler_extender.extender import Extender
from tidal.scheduler_extender.run import ServeOptions, verb_config
from tidal.scheduler_extender.server import create_app


@pytest.mark.parametrize(
    ("host", "client_ca", "allowed"),
    [
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("localhost", False, True),
        ("0.0.0.0", False, False),
        ("10.1.2.3", False, False),
        ("0.0.0.0", True, True),
    ],
)
def test_only_loopback_may_go_without_client_certificates(
    tmp_path: Path, host: str, client_ca: bool, allowed: bool
) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("")
    tls = {"tls_cert": pem, "tls_key": pem, "tls_client_ca": pem} if client_ca else {}
    options = ServeOptions(host=host, **tls)  # type: ignore[arg-type]
    if allowed:
        options.check()
    else:
        with pytest.raises(ValueError, match="bind pods and evict them"):
            options.check()


def test_client_certificates_need_a_serving_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need TLS"):
        ServeOptions(tls_client_ca=tmp_path).check()


def _server(options: ServeOptions) -> Iterator[str]:
    cache = ClusterCache()
    app = create_app(Extender(cache, FakeCluster(cache)), ready=lambda: True)
    server = uvicorn.Server(verb_config(options, app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{options.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[str]:
    options = ServeOptions(
        port=free_port(),
        tls_cert=pki.serving_cert,
        tls_key=pki.serving_key,
        tls_client_ca=pki.ca_cert,
        log_level="warning",
    )
    yield from _server(options)


def test_mutual_tls_turns_away_callers_without_a_client_certificate(
    pki: Pki, mtls_server: str
) -> None:
    anonymous = ssl.create_default_context(cafile=str(pki.ca_cert))
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(f"https://{mtls_server}/readyz", context=anonymous, timeout=5)
    scheduler = ssl.create_default_context(cafile=str(pki.ca_cert))
    scheduler.load_cert_chain(str(pki.scheduler_client_cert), str(pki.scheduler_client_key))
    with urllib.request.urlopen(
        f"https://{mtls_server}/readyz", context=scheduler, timeout=5
    ) as response:
        assert response.status == 200


@pytest.fixture
def plain_server(monkeypatch: Any) -> Iterator[str]:
    monkeypatch.setattr(run, "HEAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(run, "MAX_CONNECTIONS", 4)
    yield from _server(ServeOptions(port=free_port(), log_level="warning"))


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (sending ``trickle`` bytes of a
    request head one at a time meanwhile, as a slowloris client would)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sent < len(trickle):
                sock.send(trickle[sent : sent + 1])
                sent += 1
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            return True
    return False


def _connect(address: str) -> socket.socket:
    host, port = address.split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_idle_and_slow_connections_are_closed(plain_server: str) -> None:
    with _connect(plain_server) as idle:
        assert _closed_within(idle, 5)
    head = b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" * 10
    with _connect(plain_server) as slow:
        assert _closed_within(slow, 5, trickle=head)


def test_connections_beyond_the_limit_are_closed_at_once(plain_server: str) -> None:
    held = [_connect(plain_server) for _ in range(4)]
    try:
        with _connect(plain_server) as extra:
            assert _closed_within(extra, 0.4)  # well before the head timeout
    finally:
        for sock in held:
            sock.close()

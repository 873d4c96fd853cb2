"""Child processes of the local control plane: start with a log file, wait for health, stop."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tidal.devcluster.binaries import DevClusterError

LOG_TAIL_LINES = 40


_PORT_RANGE = (20000, 32767)  # below Linux's ephemeral range (32768+), where outgoing
# connections take their local ports: a kernel-chosen free port could be taken by one of those
# between our check and the component's bind.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, not handed out before by this process."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise DevClusterError(f"no free port in {_PORT_RANGE[0]}..{_PORT_RANGE[1]}")


def insecure_tls() -> ssl.SSLContext:
    """For health probes of components with self-signed serving certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Component:
    """One control-plane binary with its arguments, log file and health probe."""

    name: str
    argv: list[str]
    log: Path
    healthy: Callable[[], bool]
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pid: int | None = None
    prepare: Callable[[], None] | None = field(default=None, repr=False)  # before each start
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment

    def start(self) -> None:
        if self.prepare is not None:
            self.prepare()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # A session of its own: the process survives the CLI that started it (dev-cluster
            # up), and a stop can signal its whole group.
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        self.pid = self.popen.pid

    def exited(self) -> int | None:
        """The exit status if the process has ended, else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if self.pid is not None and pid_alive(self.pid) else -1

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.exited()
            if status is not None:
                raise DevClusterError(
                    f"{self.name} exited with status {status}; last lines of {self.log}:\n"
                    f"{tail(self.log)}"
                )
            if self.healthy():
                return
            time.sleep(0.1)
        raise DevClusterError(
            f"{self.name} not healthy after {timeout_s:.0f} s; last lines of {self.log}:\n"
            f"{tail(self.log)}"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        if self.pid is None:
            return
        stop_process_group(self.pid, grace_s)
        if self.popen is not None:
            self.popen.wait()
        self.popen = None
        self.pid = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(pid: int, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            # Reap it when it is our child; otherwise just watch it go.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return

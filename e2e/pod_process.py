"""A kubelet for one pod: run a pod's container as a local process, and report on the pod what a
kubelet would.

KWOK runs no containers, so an end-to-end test that needs a worker to really run (serve, batch,
be preempted and resume) takes a pod the operator created and runs its exact command line and
environment here::

    with PodProcess(core, "job-0-1", ns, extra_env={"CUDA_VISIBLE_DEVICES": ""},
                    kubeconfig=cluster.pod_kubeconfig(ns, "job-0-1", tmp_path / "kc")) as pod:
        pod.start()          # takes the pod over from KWOK, waits for its node, runs it
        pod.wait_ready()     # Ready, from its readinessProbe (at once without one)
        ...                  # evict it, delete it, or let it finish
        pod.wait_exit()      # the exit code, once its end is on the pod
    # stop() (on leaving the block) ends whatever still runs

What it does, as a kubelet does:

- **Takes the pod over.** :meth:`PodProcess.start` annotates the pod ``tidal.dev/kwok-external``,
  which KWOK's pod stages leave alone (``tidal/devcluster/kwok-stages.yaml``), then waits until
  the pod is bound to a node. Call it as soon as the pod exists: a pod bound before the
  annotation may have been made Running and Ready by KWOK meanwhile; the harness writes its own
  status over that at once, and keeps writing it whenever it reads differently.
- **Runs the container.** ``entrypoint`` stands in for the image's ENTRYPOINT (the container's
  ``command``, when it has one, replaces it, as in Kubernetes), followed by the container's
  ``args``, ``$(VAR)`` references expanded. The environment is this process's minus ``TIDAL_*``
  and ``KUBECONFIG`` (a container sees only what its pod gives it), then the container's ``env``
  (values, and ``fieldRef`` of the pod's metadata, spec and status), then what ``admit``
  returned, then ``extra_env`` (the device plugin's Allocate environment, local stand-ins for
  volumes such as TIDAL_PVC_ROOT), then ``KUBECONFIG=<kubeconfig>``: the credentials the kubelet
  would mount (give it a kubeconfig with a pod-bound token, ``LocalCluster.pod_kubeconfig``).
  Output goes to :attr:`log_path`.
- **Admits it** first, if given ``admit``: called with the bound pod before its process starts,
  while the pod is still Pending on its node, as a kubelet admits a pod (e.g. a test calls the
  node agent's device plugin Allocate there, which looks for the node's Pending pods); the
  environment it returns goes to the container, as Allocate's does.
- **Reports status.** Running with the container running when the process starts; Ready and
  ContainersReady from the readinessProbe (an HTTP GET of 127.0.0.1:<port><path>, polled every
  ``poll_s`` rather than every periodSeconds, so tests need not wait; failureThreshold failures
  in a row make it unready again), True at once without a probe. Startup and liveness probes
  are not run. When the process exits: phase Succeeded (exit 0) or Failed, with
  ``containerStatuses[0].state.terminated.exitCode``. A process killed by signal N reports
  128 + N (143 for SIGTERM, 137 for SIGKILL), as container runtimes do. The container is never
  restarted, whatever the pod's restartPolicy.
- **Stops it when the pod is deleted** (an eviction, a preemption, a scale-down): SIGTERM to
  the process, SIGKILL to its process group after the deletion's grace period
  (``metadata.deletionGracePeriodSeconds``, else ``spec.terminationGracePeriodSeconds``), the
  exit code reported as above, then the deletion finished (grace 0, on the pod's uid). The
  operator thus sees, in order, the pod terminating, then Failed with exit code 143 and whatever
  annotations the process wrote in its grace period, then gone.

The API: ``start()``, ``wait_ready(timeout_s)``, ``wait_exit(timeout_s)`` (the exit code),
``exit_code`` (None while it runs), ``ready``, ``finished``, ``last_pod`` (the pod as last read,
its final status included), ``log_path`` and ``log_text()``, and ``stop()``: SIGTERM, SIGKILL
after the pod's grace period, the end reported on the pod (still there, in a terminal phase,
which the API server deletes at once when asked). A context manager stops on exit. Errors
(a pod never bound, an env source the harness cannot resolve) raise PodProcessError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from kubernetes.client.exceptions import ApiException

from tidal import api
from tidal.devcluster.nodes import KWOK_EXTERNAL_ANNOTATION

DEFAULT_ENTRYPOINT = (sys.executable, "-m", "tidal.cli", "worker")
DEFAULT_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
LOCALHOST = "127.0.0.1"  # where the process listens: its "pod IP"
# Conditions the kubelet owns; the others (PodScheduled, DisruptionTarget, tidal.dev/…) belong
# to the scheduler, the eviction API and the extender, and are never touched.
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodProcessError(RuntimeError):
    """The harness cannot run or follow the pod; the message says why."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a container runtime reports it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def expand(text: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` replaced by ``env``'s value as the kubelet does: an undefined reference stays
    as written, and ``$$`` is a literal ``$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a ``fieldRef`` (what the downward API offers), from the pod as read."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or LOCALHOST,
        "status.hostIP": status.get("hostIP") or LOCALHOST,
    }
    if path in simple:
        return str(simple[path] or "")
    subscript = _SUBSCRIPT.match(path)
    if subscript:
        return str((meta.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise PodProcessError(f"fieldRef {path!r} is not one the harness resolves")


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The container's ``env``, resolved in order (a value may refer to an earlier one)."""
    env: dict[str, str] = {}
    for entry in container.get("env") or ():
        name, source = entry["name"], entry.get("valueFrom")
        if source is None:
            env[name] = expand(str(entry.get("value", "")), env)
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            kinds = ", ".join(source)
            raise PodProcessError(f"env {name}: the harness does not resolve {kinds}")
    return env


def _inherited_env() -> dict[str, str]:
    """This process's environment without what would leak the test's own settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(api.ENV_PREFIX) and key != "KUBECONFIG"
    }


def _condition(kind: str, true: bool, since: str, reason: str = "") -> dict[str, Any]:
    condition = {"type": kind, "status": "True" if true else "False", "lastTransitionTime": since}
    if reason:
        condition["reason"] = reason
    return condition


def _current_conditions(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or ()}


class PodProcess:
    """Plays kubelet for pod ``namespace/pod_name``; see the module docstring."""

    def __init__(
        self,
        core_api: Any,
        pod_name: str,
        namespace: str,
        *,
        entrypoint: Sequence[str] = DEFAULT_ENTRYPOINT,
        extra_env: Mapping[str, str] | None = None,
        kubeconfig: Path | None = None,
        log_dir: Path | None = None,
        poll_s: float = 0.2,
        bind_timeout_s: float = 60.0,
        admit: Callable[[dict[str, Any]], Mapping[str, str]] | None = None,
    ) -> None:
        self.core = core_api
        self.name = pod_name
        self.namespace = namespace
        self.entrypoint = tuple(entrypoint)
        self.extra_env = dict(extra_env or {})
        self.kubeconfig = kubeconfig
        self.poll_s = poll_s
        self.bind_timeout_s = bind_timeout_s
        self.admit = admit
        directory = log_dir or Path(tempfile.gettempdir()) / "tidal-pod-process"
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{namespace}.{pod_name}.log"
        self.last_pod: dict[str, Any] = {}
        self.exit_code: int | None = None
        self.ready = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_at = ""
        self._probe_failures = 0
        self._became_ready = threading.Event()
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the API --------------------------------------------------------------------------
    def start(self) -> PodProcess:
        """Take the pod over from KWOK, wait until it is bound, start its process and report
        it Running; a thread then follows the pod and the process until the end."""
        if self._thread is not None:
            raise PodProcessError(f"pod {self.name}: started already")
        self._patch({"metadata": {"annotations": {KWOK_EXTERNAL_ANNOTATION: "true"}}})
        pod = self._wait_bound()
        admitted = dict(self.admit(pod)) if self.admit is not None else {}
        command, env = self._command(pod, admitted)
        self._log = self.log_path.open("ab")
        self._log.write(f"--- pod-process: {self.namespace}/{self.name}: {command}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            command,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: what SIGKILL reaches at the end
        )
        self._started_at = _now()
        try:
            self._sync_running(pod)
        except BaseException:  # never leave a process behind a failed start
            self._kill_group()
            self._reap(self._process.wait())
            self._log.close()
            raise
        self._thread = threading.Thread(target=self._follow, name=f"pod-{self.name}", daemon=True)
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        """The process ended and its end is on the pod (or the pod is gone)."""
        return self._finished.is_set()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the pod is Ready; PodProcessError (with the log's tail) if the process ends
        first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self._became_ready.wait(0.05):
            if self.finished or time.monotonic() > deadline:
                why = f"exited with {self.exit_code}" if self.finished else "timed out"
                raise PodProcessError(f"pod {self.name} never became ready ({why}):\n{self.tail()}")
        self._raise_error()

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        """The exit code, once the process ended and its end is on the pod."""
        if not self._finished.wait(timeout_s):
            raise PodProcessError(f"pod {self.name} still runs after {timeout_s:.0f} s")
        self._raise_error()
        assert self.exit_code is not None
        return self.exit_code

    def stop(self, timeout_s: float | None = None) -> int | None:
        """End the process as a kubelet that stops the container (SIGTERM, SIGKILL after the
        pod's grace period) and report its end on the pod; the exit code (None if it never
        started)."""
        if self._thread is None:
            return None
        self._stopping.set()
        self._thread.join(timeout_s)
        self._raise_error()
        return self.exit_code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> PodProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- following the pod ----------------------------------------------------------------
    def _follow(self) -> None:
        """Until the end: the pod deleted (stop the process, finish the deletion), the
        process exited, or stop() called."""
        try:
            while True:
                pod = self._read()
                if pod is None:  # deleted with grace 0 by someone else: no time to stop
                    self._kill_group()
                    self._reap(self._wait_process(0))
                    return
                if pod["metadata"].get("deletionTimestamp"):
                    self._reap(self._terminate(self._grace_s(pod, deleting=True)))
                    self._report_end()
                    self._finish_deletion(pod)
                    return
                code = self._process.poll() if self._process else 0
                if code is not None:
                    self._reap(code)
                    self._report_end()
                    return
                if self._stopping.is_set():
                    self._reap(self._terminate(self._grace_s(pod, deleting=False)))
                    self._report_end()
                    return
                self._sync_running(pod)
                self._stopping.wait(self.poll_s)
        except BaseException as error:  # said by wait_*/stop; never a process left behind
            self._error = error
            self._kill_group()
        finally:
            if self._log is not None:
                self._log.close()
            self._finished.set()

    def _terminate(self, grace_s: float) -> int:
        """SIGTERM to the process (the container's PID 1), SIGKILL after ``grace_s``."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)
        return self._wait_process(grace_s)

    def _wait_process(self, grace_s: float) -> int:
        assert self._process is not None
        try:
            code = self._process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._kill_group()
            code = self._process.wait()
        self._kill_group()  # the container goes, and every process in it
        return code

    def _kill_group(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)

    def _reap(self, returncode: int) -> None:
        self.exit_code = exit_code_of(returncode)
        self.ready = False

    # -- the pod --------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            response = self.core.read_namespaced_pod(
                self.name, self.namespace, _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        pod: dict[str, Any] = json.loads(response.data)
        self.last_pod = pod
        return pod

    def _patch(self, body: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod(self.name, self.namespace, body)

    def _patch_status(self, status: dict[str, Any]) -> None:
        """A strategic merge: conditions merge by type, container statuses by name, so what
        others wrote (PodScheduled, DisruptionTarget) stays."""
        response = self.core.patch_namespaced_pod_status(
            self.name, self.namespace, {"status": status}, _preload_content=False
        )
        self.last_pod = json.loads(response.data)

    def _wait_bound(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.bind_timeout_s
        while True:
            pod = self._read()
            if pod is None:
                raise PodProcessError(f"pod {self.namespace}/{self.name} does not exist")
            if (pod.get("spec") or {}).get("nodeName"):
                return pod
            if time.monotonic() > deadline:
                raise PodProcessError(
                    f"pod {self.name} not bound to a node after {self.bind_timeout_s:.0f} s: "
                    f"{json.dumps((pod.get('status') or {}).get('conditions'))}"
                )
            time.sleep(self.poll_s)

    def _container(self, pod: Mapping[str, Any]) -> Mapping[str, Any]:
        container: Mapping[str, Any] = pod["spec"]["containers"][0]
        return container

    def _command(
        self, pod: Mapping[str, Any], admitted: Mapping[str, str] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        container = self._container(pod)
        own = container_env(pod, container)
        entry = container.get("command") or self.entrypoint
        command = [expand(part, own) for part in (*entry, *(container.get("args") or ()))]
        env = {**_inherited_env(), **own, **(admitted or {}), **self.extra_env}
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return command, env

    def _grace_s(self, pod: Mapping[str, Any], *, deleting: bool) -> float:
        if deleting and pod["metadata"].get("deletionGracePeriodSeconds") is not None:
            return float(pod["metadata"]["deletionGracePeriodSeconds"])
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
        return float(DEFAULT_GRACE_S if grace is None else grace)

    # -- status ---------------------------------------------------------------------------
    def _probe_ok(self, pod: Mapping[str, Any]) -> bool:
        """The readinessProbe's verdict now (True without one); failureThreshold failures in
        a row make a ready pod unready."""
        container = self._container(pod)
        probe = container.get("readinessProbe")
        if probe is None:
            return True
        get = probe.get("httpGet")
        if get is None:
            raise PodProcessError(f"pod {self.name}: only httpGet readiness probes are run")
        if self._http_ok(container, get, float(probe.get("timeoutSeconds", 1))):
            self._probe_failures = 0
            return True
        self._probe_failures += 1
        return self.ready and self._probe_failures < int(probe.get("failureThreshold", 3))

    def _http_ok(
        self, container: Mapping[str, Any], get: Mapping[str, Any], timeout: float
    ) -> bool:
        port = get["port"]
        if isinstance(port, str) and not port.isdigit():
            named = {p.get("name"): p["containerPort"] for p in container.get("ports") or ()}
            if port not in named:
                raise PodProcessError(f"pod {self.name}: probe port {port!r} is not declared")
            port = named[port]
        scheme = str(get.get("scheme", "HTTP")).lower()
        url = f"{scheme}://{get.get('host') or LOCALHOST}:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return 200 <= int(response.status) < 400
        except (urllib.error.URLError, OSError):
            return False

    def _sync_running(self, pod: Mapping[str, Any]) -> None:
        """Write the running status when the pod reads otherwise (KWOK may have written its
        own before it saw the annotation; readiness may have changed)."""
        ready = self._probe_ok(pod)
        current = _current_conditions(pod)
        status = pod.get("status") or {}
        state = ((status.get("containerStatuses") or [{}])[0]).get("state") or {}
        wanted = {"PodReadyToStartContainers": True, "Initialized": True,
                  "ContainersReady": ready, "Ready": ready}  # fmt: skip
        stale = status.get("phase") != "Running" or set(state) != {"running"}
        stale = stale or any(
            (current.get(kind) or {}).get("status") != ("True" if true else "False")
            for kind, true in wanted.items()
        )
        if stale:
            self._patch_status(self._running_status(pod, wanted))
        self.ready = ready
        if ready:
            self._became_ready.set()
        else:
            self._became_ready.clear()

    def _conditions(
        self, pod: Mapping[str, Any], wanted: Mapping[str, bool], reason: str = ""
    ) -> list[dict[str, Any]]:
        """The kubelet's conditions; each keeps its transition time while its status holds."""
        current, now = _current_conditions(pod), _now()
        out = []
        for kind, true in wanted.items():
            before = current.get(kind) or {}
            same = before.get("status") == ("True" if true else "False")
            since = str(before.get("lastTransitionTime") or now) if same else now
            out.append(_condition(kind, true, since, "" if true else reason))
        return out

    def _container_status(self, pod: Mapping[str, Any], ready: bool) -> dict[str, Any]:
        container = self._container(pod)
        assert self._process is not None
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"pod-process://{self._process.pid}",
            "ready": ready,
            "restartCount": 0,
        }

    def _running_status(self, pod: Mapping[str, Any], wanted: Mapping[str, bool]) -> dict[str, Any]:
        ready = wanted["Ready"]
        running = {"running": {"startedAt": self._started_at}, "waiting": None, "terminated": None}
        return {
            "phase": "Running",
            "startTime": (pod.get("status") or {}).get("startTime") or self._started_at,
            "conditions": self._conditions(pod, wanted, "ContainersNotReady"),
            "containerStatuses": [
                {**self._container_status(pod, ready), "started": True, "state": running}
            ],
        }

    def _report_end(self) -> None:
        """Phase Succeeded or Failed with the exit code, unless the pod is gone already."""
        pod = self._read()
        if pod is None:
            return
        code = self.exit_code if self.exit_code is not None else 0
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": self._started_at,
            "finishedAt": _now(),
            "containerID": f"pod-process://{self._process.pid if self._process else 0}",
        }
        done = {"PodReadyToStartContainers": False, "ContainersReady": False, "Ready": False}
        reason = "PodCompleted" if code == 0 else "PodFailed"
        state = {"terminated": terminated, "running": None, "waiting": None}
        self._patch_status(
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": self._conditions(pod, done, reason),
                "containerStatuses": [
                    {**self._container_status(pod, False), "started": False, "state": state}
                ],
            }
        )

    def _finish_deletion(self, pod: Mapping[str, Any]) -> None:
        """As the kubelet, once the pod's containers are gone: delete it for good (grace 0),
        only if it is still the pod that was run."""
        options = {"gracePeriodSeconds": 0, "preconditions": {"uid": pod["metadata"]["uid"]}}
        try:
            self.core.delete_namespaced_pod(self.name, self.namespace, body=options)
        except ApiException as error:
            if error.status not in (404, 409):  # gone already, or another pod of that name
                raise

    def _raise_error(self) -> None:
        if self._error is not None:
            raise PodProcessError(f"pod {self.name}: the harness failed: {self._error}") from (
                self._error
            )

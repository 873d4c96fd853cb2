"""Worker groups on one machine without Kubernetes: place them on this machine's GPUs with the
same placement core the extender uses, launch them with the device plugin's environment, and
supervise them (restart on crash with backoff, clean stop on SIGTERM, one log file per worker).

Spec file (YAML)::

    logDir: ./tidal-logs            # optional; default ./tidal-logs
    stopGracePeriodSeconds: 30      # optional: SIGTERM, then SIGKILL after this long
    workers:
      - name: chat                  # DNS-label-like; replicas are chat-0, chat-1, ...
        gpus: 4                     # tensor-parallel group size
        replicas: 1                 # optional, default 1
        topology: {mode: guaranteed, tier: nvlink}   # optional; default by group size
        command: [python, -m, my.server, --port, "8000"]
        env: {MODEL: /models/llama}  # optional
        restart: on-failure         # always | on-failure | never (default on-failure)

A worker runs ``command``, or instead a real tidal worker, started as the operator's pods start
it: ``serve`` or ``batch`` (exactly one of the three) expands to ``python -m tidal worker serve
--port=<port> <args>`` / ``... worker batch <args>`` with the same ``TIDAL_*`` environment an
LLMService replica / LLMBatchJob worker gets (``tidal.api.worker_env`` and ``batch_env``;
TIDAL_TENSOR_PARALLEL is ``gpus``, TIDAL_WORKER_INDEX the replica). ``env`` is applied last,
so it can override any of it::

      - name: chat
        gpus: 4
        replicas: 2
        serve:
          model: hf://meta-llama/Llama-3.1-70B-Instruct   # required: the model URI
          modelName: llama-70b      # optional; default the worker's name
          port: 8000                # optional, default 8000; replica r listens on port + r
          dtype: bfloat16           # optional, default bfloat16
          attention: int8           # optional, default int8
          args: []                  # optional: appended to the command line
      - name: summarise
        gpus: 2
        replicas: 2                 # replica r takes shard r/2 of the input
        batch:
          model: file:///models/llama-8b
          input: file:///data/docs/
          output: file:///data/summaries/
          checkpointIntervalSeconds: 600   # optional, default 600
          resumeFrom: ""            # optional: a checkpoint to start from
          # modelName, dtype, attention and args as for serve

Without Kubernetes nobody records a batch worker's checkpoints: a restarted one starts again
from ``resumeFrom``, as attempt 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import yaml

from tidal import api
from tidal.node_agent.allocation import container_env
from tidal.node_agent.publish import Discovery
from tidal.placement import (
    ClusterSnapshot,
    NodeInfo,
    PodInfo,
    PodRequest,
    TopologyMode,
    best_placement,
    default_topology,
)
from tidal.topology import Tier, bits

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
RESTART_POLICIES = ("always", "on-failure", "never")
# `tidal worker` with this interpreter: the node agent's own installation has the worker.
WORKER_ENTRYPOINT = (sys.executable, "-m", "tidal", "worker")
DEFAULT_PORT = 8000
DEFAULT_CHECKPOINT_INTERVAL_S = 600


class SpecError(ValueError):
    """A standalone spec is malformed; the message names the field."""


class PlacementError(RuntimeError):
    """The workers do not fit this machine's GPUs; the message says which and why."""


@dataclass(frozen=True)
class TidalWorker:
    """A real ``tidal worker serve|batch``, with the command line and environment the
    operator's pods give it."""

    kind: str  # api.WORKER_SERVE | api.WORKER_BATCH
    model_uri: str
    model_name: str
    dtype: str = api.DEFAULT_DTYPE
    attention: str = api.DEFAULT_ATTENTION
    args: tuple[str, ...] = ()
    port: int = DEFAULT_PORT  # serve: of replica 0
    input_uri: str = ""  # batch
    output_uri: str = ""
    checkpoint_interval_s: int = DEFAULT_CHECKPOINT_INTERVAL_S
    resume_from: str = ""

    def command(self, replica: int) -> tuple[str, ...]:
        """Replicas share the machine, so each server listens on a port of its own."""
        if self.kind == api.WORKER_SERVE:
            return (*WORKER_ENTRYPOINT, *api.serve_args(self.port + replica, self.args))
        return (*WORKER_ENTRYPOINT, *api.batch_args(self.args))

    def env(self, replica: int, replicas: int, gpus: int) -> dict[str, str]:
        env = api.worker_env(
            model_name=self.model_name, model_uri=self.model_uri, dtype=self.dtype,
            attention=self.attention, tensor_parallel=gpus, index=replica,
        )  # fmt: skip
        if self.kind == api.WORKER_BATCH:
            env |= api.batch_env(
                input_uri=self.input_uri, output_uri=self.output_uri, index=replica,
                parallelism=replicas, checkpoint_interval_s=self.checkpoint_interval_s,
                resume_from=self.resume_from, attempt=1,
            )  # fmt: skip
        return env


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    gpus: int
    command: tuple[str, ...]  # empty when ``tidal`` says what to run
    replicas: int = 1
    mode: TopologyMode = TopologyMode.BEST_EFFORT
    tier: Tier = Tier.NVLINK
    env: Mapping[str, str] = field(default_factory=dict)
    restart: str = "on-failure"
    tidal: TidalWorker | None = None

    def command_for(self, replica: int) -> tuple[str, ...]:
        return self.tidal.command(replica) if self.tidal else self.command

    def env_for(self, replica: int) -> dict[str, str]:
        """The worker's own environment for ``replica``: a tidal worker's TIDAL_*, then
        ``env`` (which wins)."""
        base = self.tidal.env(replica, self.replicas, self.gpus) if self.tidal else {}
        return {**base, **self.env}


@dataclass(frozen=True)
class StandaloneSpec:
    workers: tuple[WorkerSpec, ...]
    log_dir: Path = Path("tidal-logs")
    stop_grace_s: float = 30.0


def parse_spec(text: str, source: str, has_nvswitch: bool = False) -> StandaloneSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with 'workers'")
    workers = data.get("workers")
    if not isinstance(workers, list) or not workers:
        raise SpecError(f"{source}: field 'workers': expected a non-empty list")
    parsed = tuple(
        _worker(w, f"{source}: workers[{i}]", has_nvswitch) for i, w in enumerate(workers)
    )
    names = [w.name for w in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise SpecError(f"{source}: field 'workers': name {duplicate!r} is used twice")
    grace = data.get("stopGracePeriodSeconds", 30)
    if not isinstance(grace, int | float) or grace < 0:
        raise SpecError(f"{source}: field 'stopGracePeriodSeconds': expected a number >= 0")
    return StandaloneSpec(parsed, Path(str(data.get("logDir", "tidal-logs"))), float(grace))


def _worker(data: object, where: str, has_nvswitch: bool) -> WorkerSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{where}.name: expected a lowercase DNS label, got {name!r}")
    gpus, replicas = data.get("gpus"), data.get("replicas", 1)
    for key, value in (("gpus", gpus), ("replicas", replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{where}.{key}: expected an integer >= 1, got {value!r}")
    command, tidal = _what_to_run(data, where, name)
    env = data.get("env") or {}
    if not isinstance(env, dict):
        raise SpecError(f"{where}.env: expected a mapping of names to strings")
    restart = data.get("restart", "on-failure")
    if restart not in RESTART_POLICIES:
        raise SpecError(f"{where}.restart: expected one of {', '.join(RESTART_POLICIES)}")
    assert isinstance(gpus, int) and isinstance(replicas, int)
    mode, tier = _topology(data.get("topology"), where, gpus, has_nvswitch)
    return WorkerSpec(
        name, gpus, command, replicas, mode, tier,
        {str(k): str(v) for k, v in env.items()}, str(restart), tidal,
    )  # fmt: skip


def _what_to_run(
    data: Mapping[str, object], where: str, name: str
) -> tuple[tuple[str, ...], TidalWorker | None]:
    """(command, tidal worker): exactly one of command, serve and batch."""
    given = [key for key in ("command", api.WORKER_SERVE, api.WORKER_BATCH) if key in data]
    if len(given) != 1:
        raise SpecError(f"{where}: give exactly one of command, serve and batch (got "
                        f"{', '.join(given) or 'none'})")  # fmt: skip
    if given[0] != "command":
        return (), _tidal_worker(data[given[0]], f"{where}.{given[0]}", given[0], name)
    command = data["command"]
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise SpecError(f"{where}.command: expected a non-empty list of strings")
    return tuple(command), None


def _text(data: Mapping[str, object], key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise SpecError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _number(data: Mapping[str, object], key: str, where: str, default: int, low: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SpecError(f"{where}.{key}: expected an integer >= {low}, got {value!r}")
    return value


def _tidal_worker(data: object, where: str, kind: str, name: str) -> TidalWorker:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping with at least 'model'")
    args = data.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}.args: expected a list of strings")
    common = TidalWorker(
        kind, _text(data, "model", where), _text(data, "modelName", where, name),
        _text(data, "dtype", where, api.DEFAULT_DTYPE),
        _text(data, "attention", where, api.DEFAULT_ATTENTION), tuple(args),
    )  # fmt: skip
    if kind == api.WORKER_SERVE:
        port = _number(data, "port", where, DEFAULT_PORT, 1)
        if port > 65535:
            raise SpecError(f"{where}.port: expected a port 1..65535, got {port}")
        return replace(common, port=port)
    interval = "checkpointIntervalSeconds"
    return replace(
        common, input_uri=_text(data, "input", where), output_uri=_text(data, "output", where),
        checkpoint_interval_s=_number(data, interval, where, DEFAULT_CHECKPOINT_INTERVAL_S, 1),
        resume_from=_text(data, "resumeFrom", where, ""),
    )  # fmt: skip


def _topology(data: object, where: str, gpus: int, has_nvswitch: bool) -> tuple[TopologyMode, Tier]:
    default_mode, default_tier = default_topology(gpus, has_nvswitch)
    if data is None:
        return default_mode, default_tier
    if not isinstance(data, dict):
        raise SpecError(f"{where}.topology: expected a mapping with mode and tier")
    try:
        mode = TopologyMode(data.get("mode", default_mode.value))
    except ValueError as error:
        modes = ", ".join(m.value for m in TopologyMode)
        raise SpecError(f"{where}.topology.mode: expected one of {modes}") from error
    try:
        tier = Tier.parse(str(data.get("tier", default_tier.label)))
    except ValueError as error:
        raise SpecError(f"{where}.topology.tier: {error}") from error
    if tier is Tier.RACK:
        raise SpecError(f"{where}.topology.tier: 'rack' needs several machines")
    return mode, tier


# -- placement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One replica of a worker group on its GPUs."""

    worker: WorkerSpec
    replica: int
    gpus: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.worker.name}-{self.replica}"


def place(spec: StandaloneSpec, discovery: Discovery, healthy: Sequence[int]) -> list[Slot]:
    """Every replica's GPUs, largest groups first (they need the big aligned domains), with
    the fragmentation-aware choice of the placement core. Unhealthy GPUs are never used."""
    node = discovery.node
    shape = discovery.shape
    busy = shape.full_mask & ~sum(1 << g for g in healthy)
    blocker = [PodInfo("unhealthy", "unhealthy GPUs", node, busy, 0)] if busy else []
    snapshot = ClusterSnapshot([NodeInfo(node, shape, 10**9, 10**9)], blocker)
    wanted = [(w, r) for w in spec.workers for r in range(w.replicas)]
    slots: dict[tuple[str, int], Slot] = {}
    for worker, replica in sorted(wanted, key=lambda wr: -wr[0].gpus):
        request = PodRequest(
            f"{worker.name}-{replica}", worker.name, worker.gpus, 0,
            mode=worker.mode, tier=worker.tier,
        )  # fmt: skip
        placement = best_placement(snapshot, request)
        if placement is None:
            free = bits(snapshot.free_gpus(node, request.uid))
            raise PlacementError(
                f"worker {request.uid} needs {worker.gpus} GPUs ({worker.mode.value} at tier "
                f"{worker.tier.label}); free GPUs left: {free or 'none'}"
            )
        snapshot.add_pod(PodInfo(request.uid, request.name, node, placement.gpus, 0))
        slots[worker.name, replica] = Slot(worker, replica, tuple(bits(placement.gpus)))
    return [slots[w.name, r] for w, r in wanted]


# -- supervision --------------------------------------------------------------------------


@dataclass
class Running:
    slot: Slot
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff_s: float = 1.0
    next_start: float = 0.0
    finished: bool = False
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs the slots' processes until :meth:`stop` (or all have finished for good)."""

    STABLE_S = 60.0  # a worker that ran this long gets its backoff reset
    MAX_BACKOFF_S = 30.0

    def __init__(self, spec: StandaloneSpec, discovery: Discovery, slots: Sequence[Slot]) -> None:
        self.spec = spec
        self.stop_event = threading.Event()
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        facts, topo, shape = discovery.facts, discovery.topology, discovery.shape
        self.workers = [
            Running(
                slot,
                {
                    **container_env(facts, topo, shape, slot.gpus),
                    "TIDAL_WORKER_NAME": slot.name,
                    "TIDAL_REPLICA": str(slot.replica),
                    **slot.worker.env_for(slot.replica),
                },
                spec.log_dir / f"{slot.name}.log",
            )
            for slot in slots
        ]

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, poll_s: float = 0.2) -> int:
        """Supervise; returns 0 when every worker ended cleanly, else 1."""
        try:
            while not self.stop_event.is_set():
                for worker in self.workers:
                    self._tend(worker)
                if all(w.finished for w in self.workers):
                    break
                self.stop_event.wait(poll_s)
        finally:
            self._terminate_all()
        failed = [w for w in self.workers if w.exit_codes and w.exit_codes[-1] not in (0, -15)]
        return 1 if failed else 0

    def _tend(self, worker: Running) -> None:
        if worker.finished:
            return
        if worker.process is None:
            if time.monotonic() >= worker.next_start:
                self._start(worker)
            return
        code = worker.process.poll()
        if code is None:
            return
        self._reap(worker, code)
        policy = worker.slot.worker.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            worker.finished = True
            log.info("worker %s exited with %d; not restarting (%s)", worker.slot.name, code,
                     policy)  # fmt: skip
            return
        ran = time.monotonic() - worker.started
        if ran >= self.STABLE_S:
            worker.backoff_s = 1.0
        worker.next_start = time.monotonic() + worker.backoff_s
        log.warning("worker %s exited with %d after %.1f s; restarting in %.0f s",
                    worker.slot.name, code, ran, worker.backoff_s)  # fmt: skip
        worker.backoff_s = min(worker.backoff_s * 2, self.MAX_BACKOFF_S)
        worker.restarts += 1

    def _start(self, worker: Running) -> None:
        worker.log_file = worker.log_path.open("ab")
        header = f"--- tidal: starting {worker.slot.name} on GPUs {list(worker.slot.gpus)}\n"
        worker.log_file.write(header.encode())
        worker.log_file.flush()
        try:
            worker.process = subprocess.Popen(
                list(worker.slot.worker.command_for(worker.slot.replica)),
                env={**os.environ, **worker.env},
                stdout=worker.log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stop reaches its children
            )
        except OSError as error:
            worker.log_file.write(f"--- tidal: cannot start: {error}\n".encode())
            self._reap(worker, 127)
            worker.finished = True
            log.error("worker %s cannot start: %s", worker.slot.name, error)
            return
        worker.started = time.monotonic()
        log.info("worker %s started (pid %d) on GPUs %s", worker.slot.name, worker.process.pid,
                 list(worker.slot.gpus))  # fmt: skip

    def _reap(self, worker: Running, code: int) -> None:
        worker.exit_codes.append(code)
        worker.process = None
        if worker.log_file is not None:
            worker.log_file.close()
            worker.log_file = None

    def _terminate_all(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after the grace period."""
        live = [w for w in self.workers if w.process is not None]
        if live:
            log.info("stopping %d workers (SIGTERM, SIGKILL after %.0f s)", len(live),
                     self.spec.stop_grace_s)  # fmt: skip
        for worker in live:
            _signal_group(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.spec.stop_grace_s
        for worker in live:
            assert worker.process is not None
            try:
                code = worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s ignored SIGTERM; killing it", worker.slot.name)
                _signal_group(worker, signal.SIGKILL)
                code = worker.process.wait()
            self._reap(worker, code)
            worker.finished = True
            log.info("worker %s stopped (exit %d)", worker.slot.name, code)


def _signal_group(worker: Running, sig: signal.Signals) -> None:
    assert worker.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.process.pid, sig)

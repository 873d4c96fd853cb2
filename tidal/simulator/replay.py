"""The web view of a replay (``tidal simulate --dashboard PATH``): a snapshot of the simulated
pool every few simulated minutes, written as one self-contained HTML page with a time slider
(:func:`tidal.webview.page.render_page`), so a day of the tide can be watched offline.

A frame is the web view's snapshot (:mod:`tidal.webview.snapshot`) with ``source``
``"simulator"`` and ``time`` in simulated seconds since the replay's start. To keep a day of a
large pool small it carries less than the extender's:

- GPUs: state, class (``online``: a service replica, ``batch``: a batch job's worker), the tier
  a replica asked for (empty for a replica without a topology mode, and for batch work, which
  asks for none) and the workload (the service, or the batch job); no namespace, no pod name.
- reservations: the preemptor replica, its node and GPUs.
- preemptions: those carried out since the previous frame (newest first), each with its
  victims (batch workers), their GPUs, the GPUs wasted and the GPU-seconds of work lost.
- pending: online replicas (``no-plan``: nothing fits and no preemption plan; ``waiting``: its
  victims are leaving) and the oldest batch job of each request shape (``no-plan``: batch work
  does not preempt), the longest waiting first, at most :data:`PENDING_LISTED`.

Recording costs nothing unless asked for: the recorded policy is replayed once more, in this
process, by :class:`RecordingReplay` (the replay is deterministic, so it is the same day).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidal.placement import NodeState, Plan, PodInfo, PodRequest, TopologyMode, make_policy
from tidal.simulator.engine import ONLINE_PRIORITY, Replay
from tidal.simulator.run import Inputs
from tidal.simulator.scenario import Scenario, ScenarioService
from tidal.topology import bits
from tidal.webview.page import render_page
from tidal.webview.snapshot import (
    GpuView,
    NodeView,
    PendingPod,
    PreemptionRecord,
    ReservationView,
    Snapshot,
    Victim,
)

if TYPE_CHECKING:
    from tidal.simulator.engine import _Replica

PENDING_LISTED = 50  # pending entries per frame: the backlog of a day is thousands of jobs
RECORDED_POLICY = "tidal"  # recorded when the scenario replays it, else its first policy


class RecordingReplay(Replay):
    """A :class:`Replay` that records a web view frame every ``every_s`` simulated seconds (at
    the first autoscaler step at or after each multiple, once the step has placed its pods)."""

    def __init__(
        self,
        scenario: Scenario,
        inputs: Inputs,
        policy_name: str,
        every_s: float,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        # Unbounded planning time, as the policies' replays have: the same plans, the same day.
        policy = make_policy(policy_name, scenario.baseline_scoring, deadline_s=math.inf)
        super().__init__(scenario, inputs.nodes, inputs.workload, policy, on_progress)
        self.every_s = every_s
        self.frames: list[dict[str, Any]] = []
        self._next_frame = 0.0
        self._recent: list[PreemptionRecord] = []  # since the last frame, oldest first
        # One dict per distinct GPU look, shared by every frame that shows it: a day of a
        # 1,000-node pool is over a million GPU cells, most of them alike.
        self._looks: dict[tuple[Any, ...], dict[str, Any]] = {}

    def _on_step(self, data: object) -> None:
        super()._on_step(data)
        now = self.snapshot.now
        if now >= self._next_frame:
            self.frames.append(self._frame())
            self._recent = []
            self._next_frame = (now // self.every_s + 1) * self.every_s

    def _carry_out(self, replica: _Replica, request: PodRequest, plan: Plan) -> None:
        victims = tuple(_victim(self.snapshot.pods[uid]) for uid in plan.victims)  # before they go
        lost_before = self.metrics.lost_gpu_seconds
        super()._carry_out(replica, request, plan)
        record = PreemptionRecord(
            time=self.snapshot.now,
            preemptor=replica.uid,
            klass="online",
            tier=_replica_gpu(0, "online", replica.service, "").tier,
            node=plan.node,
            victims=victims,
            victim_gpus=sum(victim.gpus for victim in victims),
            wasted_gpus=plan.cost.waste_gpus,
            # the engine's own count: whole jobs go, a gang's other workers included
            lost_gpu_seconds=self.metrics.lost_gpu_seconds - lost_before,
        )
        self._recent.append(record)

    # -- one frame ---------------------------------------------------------------------------

    def _frame(self) -> dict[str, Any]:
        replicas = {r.uid: r.service for running in self.replicas.values() for r in running}
        reserved: dict[str, dict[int, str]] = {}  # node -> GPU -> preemptor
        for reservation in self.snapshot.reservations.values():
            for gpu in bits(reservation.gpus):
                reserved.setdefault(reservation.node, {})[gpu] = reservation.preemptor
        snapshot = Snapshot(
            source="simulator",
            time=self.snapshot.now,
            nodes=tuple(
                _node_view(state, reserved.get(name, {}), replicas)
                for name, state in sorted(self.snapshot.nodes.items())
            ),
            reservations=tuple(
                ReservationView(r.preemptor, r.node, tuple(bits(r.gpus)))
                for r in sorted(self.snapshot.reservations.values(), key=lambda r: r.node)
            ),
            preemptions=tuple(reversed(self._recent)),
            pending=self._pending(),
        )
        frame = snapshot.to_json()
        for node in frame["nodes"]:
            node["gpus"] = [self._shared(gpu) for gpu in node["gpus"]]
        return frame

    def _shared(self, gpu: dict[str, Any]) -> dict[str, Any]:
        return self._looks.setdefault(tuple(gpu.values()), gpu)

    def _pending(self) -> tuple[PendingPod, ...]:
        now = self.snapshot.now
        pending = [
            *(PendingPod(r.uid, "no-plan", now - r.created) for r in self.pending_online),
            *(PendingPod(r.uid, "waiting", now - r.created) for r, _ in self.binding.values()),
            *(
                PendingPod(uid, "no-plan", now - arrival)
                for (arrival, uid), _ in self.pending_batch.heads()
            ),
        ]
        pending.sort(key=lambda p: (-p.waiting_s, p.pod))
        return tuple(pending[:PENDING_LISTED])


def _node_view(
    state: NodeState, reserved: Mapping[int, str], replicas: Mapping[str, ScenarioService]
) -> NodeView:
    gpus = []
    for index, owner in enumerate(state.owner):
        preemptor = reserved.get(index)
        if preemptor is not None:
            service = replicas.get(preemptor)
            gpus.append(_replica_gpu(index, "reserved", service, service.name if service else ""))
        elif owner < 0:
            gpus.append(GpuView(index, "free"))
        else:
            gpus.append(_held(index, state.pods[owner], replicas))
    return NodeView(state.name, tuple(gpus))


def _held(index: int, pod: PodInfo, replicas: Mapping[str, ScenarioService]) -> GpuView:
    workload = pod.workload or pod.uid
    if pod.priority < ONLINE_PRIORITY:
        return GpuView(index, "batch", "batch", workload=workload)
    return _replica_gpu(index, "online", replicas.get(pod.uid), workload)


def _replica_gpu(index: int, state: str, service: ScenarioService | None, workload: str) -> GpuView:
    """A GPU an online replica holds or has reserved: the tier and mode its service asks for
    (no tier without a topology mode)."""
    if service is None:
        return GpuView(index, state, "online", workload=workload)
    tier = "" if service.mode is TopologyMode.NONE else service.tier.label
    return GpuView(index, state, "online", tier, workload=workload, mode=service.mode.value)


def _victim(pod: PodInfo) -> Victim:
    klass = "online" if pod.priority >= ONLINE_PRIORITY else "batch"
    return Victim(pod.uid, klass, pod.gpu_count)


def recorded_policy(scenario: Scenario) -> str:
    return RECORDED_POLICY if RECORDED_POLICY in scenario.policies else scenario.policies[0]


def record_replay(
    scenario: Scenario,
    inputs: Inputs,
    policy_name: str,
    every_s: float,
    on_progress: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    """Replay ``policy_name`` on ``inputs``, recording a frame every ``every_s`` simulated
    seconds; the frames, in time order. ``on_progress`` gets the simulated time."""
    replay = RecordingReplay(scenario, inputs, policy_name, every_s, on_progress)
    replay.run()
    return replay.frames


def write_dashboard(path: Path, frames: list[dict[str, Any]]) -> Path:
    """The replay page with ``frames`` at ``path`` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(None, frames), encoding="utf-8")
    return path

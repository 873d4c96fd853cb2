"""The operator's pure planners, and the reconciler against an in-memory API with a fake clock."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidal.kubeclient import KubeApiError
from tidal.operator.crds import (
    custom_resource_definitions,
)
from tidal.operator.desired import (
    Event,
    plan_job,
    plan_service,
    scale_down_order,
    schedule_step,
    scheduled_replicas,
)
from tidal.operator.reconciler import Reconciler
from tidal.operator.spec import (
    ObservedPod,
    observe_pod,
    parse_job,
    parse_service,
)

NOW = "2026-11-23T12:00:00Z"


def service_obj(replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tidal.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "svc-uid", "generation": 3},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "tensorParallel": 4,
            "replicas": replicas,
            "topology": {"mode": "guaranteed", "tier": "nvlink"},
            **spec,
        },
    }


def job_obj(workers: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tidal.dev/v1alpha1",
        "kind": "LLMBatchJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "job-uid", "generation": 1},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "tensorParallel": 2,
            "parallelism": workers,
            "input": {"uri": "s3://in/"},
            "output": {"uri": "s3://out/"},
            "backoffLimit": 1,
            **spec,
        },
    }


def replica(index: int, **facts: Any) -> ObservedPod:
    base: dict[str, Any] = {
        "name": f"chat-{index}",
        "uid": f"u{index}",
        "index": index,
        "phase": "Running",
        "ready": True,
        "node": "n1",
        "tier": "nvlink",
        "spec_hash": parse_service(service_obj()).workload.spec_hash(),
    }
    return ObservedPod(**{**base, **facts})


# -- pods and services ----------------------------------------------------------------------
def test_a_service_pod_carries_scheduler_priority_gpus_topology_and_owner() -> None:
    plan = plan_service(parse_service(service_obj(1)), [], {}, {}, NOW)
    (pod,) = plan.create
    assert pod["metadata"]["name"] == "chat-0"
    assert pod["spec"]["schedulerName"] == "tidal-scheduler"
    assert pod["spec"]["priorityClassName"] == "tidal-online"
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    notes = pod["metadata"]["annotations"]
    assert notes["tidal.dev/topology-mode"] == "guaranteed"
    assert notes["tidal.dev/topology-tier"] == "nvlink"
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMService", "svc-uid", True)
    assert pod["metadata"]["labels"]["tidal.dev/llmservice"] == "chat"


def test_scale_up_fills_the_lowest_free_indices_and_skips_terminating_names() -> None:
    pods = [replica(0), replica(2, terminating=True)]
    plan = plan_service(parse_service(service_obj(3)), pods, {}, {}, NOW)
    assert [p["metadata"]["name"] for p in plan.create] == ["chat-1", "chat-3"]


def test_scale_down_removes_unbound_then_misaligned_then_those_joining_free_gpus() -> None:
    pods = [
        replica(0, node="full"),
        replica(1, node="roomy"),
        replica(2, tier="numa", node="full"),
        replica(3, node="", phase="Pending", ready=False),
    ]
    order = scale_down_order(pods, {"full": 0, "roomy": 4}, "nvlink")
    assert [p.index for p in order] == [3, 2, 1, 0]
    plan = plan_service(parse_service(service_obj(2)), pods, {"full": 0, "roomy": 4}, {}, NOW)
    assert plan.delete == ["chat-3", "chat-2"]
    assert plan.create == []


def test_outdated_replicas_are_replaced_one_at_a_time_and_only_when_all_are_ready() -> None:
    old = [replica(0, spec_hash="old"), replica(1, spec_hash="old")]
    plan = plan_service(parse_service(service_obj(2)), old, {}, {}, NOW)
    assert len(plan.delete) == 1
    one_down = [replica(0, spec_hash="old", ready=False), replica(1, spec_hash="old")]
    assert plan_service(parse_service(service_obj(2)), one_down, {}, {}, NOW).delete == []


def test_service_status_reports_ready_placements_selector_and_degraded() -> None:
    pods = [replica(0, gpus="0,1,2,3"), replica(1, node="", ready=False, unschedulable=True)]
    status = plan_service(parse_service(service_obj(2)), pods, {}, {}, NOW).status
    assert (status["replicas"], status["readyReplicas"], status["phase"]) == (2, 1, "Degraded")
    assert status["selector"] == "tidal.dev/llmservice=chat"
    assert status["placements"][0] == {
        "index": 0,
        "pod": "chat-0",
        "node": "n1",
        "gpus": "0,1,2,3",
        "tier": "nvlink",
        "phase": "Running",
    }
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["status"] == "True"
    assert "chat-1" in conditions["Degraded"]["message"]
    assert conditions["Ready"]["status"] == "False"


def test_autoscaling_bounds_clamp_replicas() -> None:
    obj = service_obj(9, autoscaling={"minReplicas": 1, "maxReplicas": 3})
    assert len(plan_service(parse_service(obj), [], {}, {}, NOW).create) == 3


# -- the schedule -----------------------------------------------------------------------------
SCHEDULE = {
    "minReplicas": 1,
    "maxReplicas": 6,
    "timeZone": "Europe/Berlin",
    "schedule": [{"at": "07:00", "replicas": 4}, {"at": "23:00", "replicas": 2}],
}


@pytest.mark.parametrize(
    ("utc", "slot", "replicas"),
    [
        ("2026-11-23T06:30:00", "2026-11-23T07:00", 4),  # 07:30 in Berlin (UTC+1)
        ("2026-11-23T05:30:00", "2026-11-22T23:00", 2),  # before the first entry: yesterday's
        ("2026-11-23T22:00:00", "2026-11-23T23:00", 2),
    ],
)
def test_the_schedule_entry_in_force_follows_the_time_zone(
    utc: str, slot: str, replicas: int
) -> None:
    autoscaling = parse_service(service_obj(autoscaling=SCHEDULE)).autoscaling
    now = dt.datetime.fromisoformat(utc).replace(tzinfo=dt.UTC)
    assert scheduled_replicas(autoscaling, now, "") == (slot, replicas)
    assert scheduled_replicas(autoscaling, now, slot) is None  # applied once: kubectl scale holds


# -- batch jobs -------------------------------------------------------------------------------
def worker(index: int, attempt: int = 1, **facts: Any) -> ObservedPod:
    base: dict[str, Any] = {
        "name": f"job-{index}-{attempt}",
        "uid": f"w{index}a{attempt}",
        "index": index,
        "phase": "Running",
        "attempt": attempt,
        "node": "n1",
    }
    return ObservedPod(**{**base, **facts})


def test_first_reconcile_creates_one_pod_per_worker_from_scratch() -> None:
    plan = plan_job(parse_job(job_obj(2)), [], {}, NOW)
    names = [p["metadata"]["name"] for p in plan.create]
    assert names == ["job-0-1", "job-1-1"]
    env = {e["name"]: e.get("value") for e in plan.create[0]["spec"]["containers"][0]["env"]}
    assert env["TIDAL_RESUME_FROM"] == ""
    assert env["TIDAL_SHARD"] == "0/2"
    assert plan.create[0]["spec"]["priorityClassName"] == "tidal-batch"
    assert plan.create[0]["metadata"]["annotations"]["tidal.dev/topology-mode"] == "best-effort"


def test_a_preempted_worker_is_counted_once_and_resumes_from_its_checkpoint() -> None:
    job = parse_job(job_obj(2))
    first = plan_job(job, [worker(0), worker(1)], {}, NOW)
    gone = worker(0, terminating=True, disrupted=True, checkpoint="s3://out/ckpt/0/step-7")
    second = plan_job(job, [worker(1)], first.status, NOW, gone=[gone])
    (pod,) = second.create
    assert pod["metadata"]["name"] == "job-0-2"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["TIDAL_RESUME_FROM"] == "s3://out/ckpt/0/step-7"
    assert (second.status["preemptions"], second.status["failed"]) == (1, 0)
    # The same deletion seen again (a repeated watch event) is not counted twice.
    again = plan_job(job, [worker(1)], second.status, NOW, gone=[gone])
    assert again.status["preemptions"] == 1
    assert [p["metadata"]["name"] for p in again.create] == ["job-0-2"]  # same name: a 409


def test_a_worker_is_not_replaced_while_its_old_pod_still_writes_its_checkpoint() -> None:
    job = parse_job(job_obj(1))
    plan = plan_job(job, [worker(0, terminating=True, disrupted=True)], {}, NOW)
    assert plan.create == []
    assert plan.status["preemptions"] == 1


def test_failures_use_up_the_backoff_limit_and_then_fail_the_job() -> None:
    job = parse_job(job_obj(1))  # backoffLimit 1
    status: dict[str, Any] = {}
    for attempt in (1, 2):
        plan = plan_job(job, [worker(0, attempt, phase="Failed")], status, NOW)
        status = plan.status
    assert status["phase"] == "Failed"
    assert status["failed"] == 2
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == (
        "BackoffLimitExceeded"
    )
    assert plan.create == []


def test_max_preemptions_fails_the_job() -> None:
    job = parse_job(job_obj(1, maxPreemptions=0))
    plan = plan_job(
        job,
        [],
        {"workers": [{"index": 0, "attempt": 1, "uid": "w0a1"}]},
        NOW,
        gone=[worker(0, terminating=True, disrupted=True)],
    )
    assert plan.status["phase"] == "Failed"
    assert "maxPreemptions 0" in plan.status["conditions"][1]["message"]


def test_a_pod_that_vanished_unseen_counts_as_a_disruption_not_a_failure() -> None:
    job = parse_job(job_obj(1))
    status = {"workers": [{"index": 0, "attempt": 3, "uid": "gone", "checkpoint": "c"}]}
    plan = plan_job(job, [], status, NOW)
    assert plan.status["preemptions"] == 1 and plan.status["failed"] == 0
    assert plan.create[0]["metadata"]["name"] == "job-0-4"


def test_the_job_succeeds_when_every_worker_has() -> None:
    job = parse_job(job_obj(2))
    plan = plan_job(job, [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")], {}, NOW)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["completionTime"] == NOW
    assert plan.create == [] and plan.delete == []


# -- how a worker's pod ends: preempted or failed -------------------------------------------
def raw_worker_pod(phase: str, exit_code: int | None = None, **meta: Any) -> dict[str, Any]:
    """Worker 0's first pod as the API returns it, evicted (a DisruptionTarget condition)."""
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        ],
    }
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": "Error"}
        status["containerStatuses"] = [{"name": "worker", "state": {"terminated": terminated}}]
    return {
        "metadata": {
            "name": "job-0-1",
            "uid": "w0a1",
            "labels": {"tidal.dev/index": "0"},
            "annotations": {"tidal.dev/attempt": "1", **meta.pop("annotations", {})},
            **meta,
        },
        "spec": {"nodeName": "n1"},
        "status": status,
    }


def test_a_worker_that_exits_143_after_its_eviction_is_preempted_not_failed() -> None:
    job = parse_job(job_obj(1))
    first = plan_job(job, [worker(0)], {}, NOW)
    ended = observe_pod(raw_worker_pod("Failed", exit_code=143))
    plan = plan_job(job, [ended], first.status, NOW)
    assert (plan.status["preemptions"], plan.status["failed"]) == (1, 0)
    assert [e.reason for e in plan.events] == ["Preempted"]
    assert [p["metadata"]["name"] for p in plan.create] == ["job-0-2"]
    # The same exit code without an eviction is the worker's own failure.
    undisrupted = raw_worker_pod("Failed", exit_code=143)
    undisrupted["status"]["conditions"] = []
    failed = plan_job(job, [observe_pod(undisrupted)], first.status, NOW)
    assert (failed.status["preemptions"], failed.status["failed"]) == (0, 1)


def test_an_evicted_worker_resumes_from_the_checkpoint_it_wrote_in_its_grace_period() -> None:
    """What the operator sees of an eviction, in order: the pod terminating and still running,
    then Failed (exit 143) with the checkpoint its process wrote on SIGTERM, then gone."""
    job = parse_job(job_obj(1))
    status = plan_job(job, [worker(0)], {}, NOW).status
    stamp: dict[str, Any] = {"deletionTimestamp": NOW}
    terminating = observe_pod(raw_worker_pod("Running", **stamp))
    plan = plan_job(job, [terminating], status, NOW)
    assert plan.create == [] and plan.status["preemptions"] == 1
    (event,) = plan.events
    assert "resumes from the last checkpoint it reports before it stops" in event.message
    note: dict[str, Any] = {"annotations": {"tidal.dev/checkpoint": "s3://out/ckpt/0/step-9"}}
    stopped = observe_pod(raw_worker_pod("Failed", exit_code=143, **stamp, **note))
    plan = plan_job(job, [stopped], plan.status, NOW)
    assert plan.create == [] and plan.events == []  # counted once; its pod is not gone yet
    plan = plan_job(job, [], plan.status, NOW, gone=[stopped])
    (pod,) = plan.create
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["TIDAL_RESUME_FROM"] == "s3://out/ckpt/0/step-9"
    assert (env["TIDAL_ATTEMPT"], plan.status["preemptions"], plan.status["failed"]) == ("2", 1, 0)


# -- the workers' pods: identity, probes, model volume ---------------------------------------
def container_of(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def env_values(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_of(pod)["env"]}


def test_every_worker_pod_runs_as_tidal_worker_with_its_token_mounted() -> None:
    service_pod_ = plan_service(parse_service(service_obj(1)), [], {}, {}, NOW).create[0]
    job_pod_ = plan_job(parse_job(job_obj(1)), [], {}, NOW).create[0]
    for pod in (service_pod_, job_pod_):
        assert pod["spec"]["serviceAccountName"] == "tidal-worker"
        assert pod["spec"]["automountServiceAccountToken"] is True
        env = env_values(pod)
        assert env["TIDAL_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["TIDAL_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert (env["TIDAL_MODEL_URI"], env["TIDAL_DTYPE"], env["TIDAL_ATTENTION"]) == (
            "hf://org/m", "bfloat16", "int8"
        )  # fmt: skip
        assert "volumes" not in pod["spec"] and "volumeMounts" not in container_of(pod)


def test_a_replica_is_probed_on_health_with_time_to_load_and_a_batch_worker_is_not() -> None:
    pod = plan_service(parse_service(service_obj(1, port=8080)), [], {}, {}, NOW).create[0]
    container = container_of(pod)
    assert container["args"] == ["serve", "--port=8080"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a model loads
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30
    job = container_of(plan_job(parse_job(job_obj(1)), [], {}, NOW).create[0])
    assert job["args"] == ["batch"]
    assert not {"startupProbe", "livenessProbe", "readinessProbe", "ports"} & job.keys()


def test_a_pvc_model_is_mounted_read_only_where_the_worker_resolves_it() -> None:
    model = {"name": "m", "uri": "pvc://weights/llama/8b"}
    for pod in (
        plan_service(parse_service(service_obj(1, model=model)), [], {}, {}, NOW).create[0],
        plan_job(parse_job(job_obj(1, model=model)), [], {}, NOW).create[0],
    ):
        assert pod["spec"]["volumes"] == [
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
        ]
        assert container_of(pod)["volumeMounts"] == [
            {"name": "model", "mountPath": "/models/weights", "readOnly": True}
        ]
        env = env_values(pod)
        assert env["TIDAL_MODEL_URI"] == "pvc://weights/llama/8b"  # the worker resolves it
        assert env["TIDAL_PVC_ROOT"] == "/models"
        assert env["TIDAL_MODEL_PATH"] == "/models/weights/llama/8b"
    root = plan_job(parse_job(job_obj(1, model={"name": "m", "uri": "pvc://w/"})), [], {}, NOW)
    assert env_values(root.create[0])["TIDAL_MODEL_PATH"] == "/models/w"


def test_a_pvc_model_must_name_a_claim_a_pod_can_mount() -> None:
    from tidal.operator.spec import SpecError  # noqa: PLC0415

    for uri in ("pvc://Weights/llama", "pvc:///llama", "pvc://we_ights/x"):
        with pytest.raises(SpecError, match=r"spec\.model\.uri: .* is not a PersistentVolumeClaim"):
            parse_job(job_obj(1, model={"name": "m", "uri": uri}))


def test_the_workers_identity_is_ensured_in_the_namespace_before_its_pods() -> None:
    kube = MemoryKube(job_obj(2))
    Reconciler(kube).reconcile("LLMBatchJob", "ns", "job")
    assert kube.identities == ["ns"]
    Reconciler(kube).reconcile("LLMBatchJob", "ns", "job")  # nothing to create: no call
    assert kube.identities == ["ns"]


# -- the reconciler against an in-memory API --------------------------------------------------
class MemoryKube:
    """Objects and pods in dictionaries; the apiserver's name uniqueness included."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in objects}
        self.pods: dict[str, dict[str, Any]] = {}
        self.uids = itertools.count()
        self.fail_creates_after: int | None = None
        self.deleted: list[tuple[str, int | None]] = []
        self.writes: list[tuple[str, Any]] = []  # every write, in order
        self.identities: list[str] = []  # namespaces the workers' identity was ensured in

    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj else None

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(("patch_status", name))
        self.objects[(kind, name)].setdefault("status", {}).update(copy.deepcopy(status))

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        self.writes.append(("set_replicas", replicas))
        self.objects[("LLMService", name)]["spec"]["replicas"] = replicas

    def owned_pods(self, label: str, namespace: str, name: str) -> list[dict[str, Any]]:
        if len(name) > 63:  # as the API server: an invalid label selector
            raise KubeApiError(400, f"list pods: invalid label selector {label}={name}")
        return [
            copy.deepcopy(p)
            for p in self.pods.values()
            if p["metadata"]["labels"].get(label) == name
        ]

    def namespace_pods(self, namespace: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for p in self.pods.values()]

    def ensure_worker_identity(self, namespace: str) -> None:
        self.identities.append(namespace)

    def create_pod(self, pod: dict[str, Any]) -> bool:
        if self.fail_creates_after is not None:
            if self.fail_creates_after == 0:
                raise RuntimeError("operator killed")
            self.fail_creates_after -= 1
        name = pod["metadata"]["name"]
        self.writes.append(("create_pod", name))
        if name in self.pods:
            return False
        pod = copy.deepcopy(pod)
        pod["metadata"]["uid"] = f"uid-{next(self.uids)}"
        pod["status"] = {"phase": "Pending"}
        self.pods[name] = pod
        return True

    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None:
        self.writes.append(("delete_pod", name))
        self.pods.pop(name, None)
        self.deleted.append((name, grace_s))

    def pods_on_node(self, node: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for p in self.pods.values() if p["spec"].get("nodeName") == node]

    def node_free_gpus(self, nodes: Any) -> dict[str, int]:
        return {}


class FakeClock:
    def __init__(self, iso: str) -> None:
        self.now = dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_a_reconcile_killed_mid_way_and_rerun_creates_no_duplicate() -> None:
    kube = MemoryKube(job_obj(4))
    kube.fail_creates_after = 2
    with pytest.raises(RuntimeError):
        Reconciler(kube).reconcile("LLMBatchJob", "ns", "job")
    kube.fail_creates_after = None
    Reconciler(kube).reconcile("LLMBatchJob", "ns", "job")  # a restarted operator
    Reconciler(kube).reconcile("LLMBatchJob", "ns", "job")
    assert sorted(kube.pods) == ["job-0-1", "job-1-1", "job-2-1", "job-3-1"]


def test_the_schedule_scales_at_its_times_and_kubectl_scale_holds_until_the_next() -> None:
    obj = service_obj(
        1,
        autoscaling={
            "maxReplicas": 6,
            "schedule": [{"at": "08:00", "replicas": 5}, {"at": "20:00", "replicas": 2}],
        },
    )
    kube, clock = MemoryKube(obj), FakeClock("2026-11-23T09:00:00")
    events: list[str] = []
    reconciler = Reconciler(kube, clock, lambda _o, e: events.append(e.reason))
    reconciler.reconcile("LLMService", "ns", "chat")
    assert kube.objects[("LLMService", "chat")]["spec"]["replicas"] == 5
    assert len(kube.pods) == 5 and "Scheduled" in events
    kube.set_replicas("ns", "chat", 3)  # kubectl scale
    reconciler.reconcile("LLMService", "ns", "chat")
    assert len(kube.pods) == 3
    clock.now = clock.now.replace(hour=20, minute=1)
    reconciler.reconcile("LLMService", "ns", "chat")
    assert len(kube.pods) == 2
    assert kube.objects[("LLMService", "chat")]["status"]["scheduleSlot"] == "2026-11-23T20:00"


def test_a_due_schedule_entry_is_planned_with_the_pods_and_applied_only_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    autoscaling = {"maxReplicas": 6, "schedule": [{"at": "08:00", "replicas": 5}]}
    kube = MemoryKube(service_obj(1, autoscaling=autoscaling))
    clock = FakeClock("2026-11-23T09:00:00")
    writes_before_planning: list[list[tuple[str, Any]]] = []

    def planning(*args: Any, **kwargs: Any) -> Any:
        writes_before_planning.append(list(kube.writes))
        return plan_service(*args, **kwargs)

    monkeypatch.setattr("tidal.operator.reconciler.plan_service", planning)
    desired = Reconciler(kube, clock).reconcile("LLMService", "ns", "chat")
    assert writes_before_planning == [[]]  # read, then plan: nothing applied before
    assert desired is not None and desired.replicas == 5
    assert desired.events[0] == Event(
        "Normal", "Scheduled", "schedule 2026-11-23T08:00: 5 replicas"
    )
    assert desired.status["scheduleSlot"] == "2026-11-23T08:00"
    assert [p["metadata"]["name"] for p in desired.create] == [f"chat-{i}" for i in range(5)]
    # Applied in order: the scale, the pods, the status.
    assert kube.writes[0] == ("set_replicas", 5)
    assert [w for w, _ in kube.writes[1:]] == ["create_pod"] * 5 + ["patch_status"]
    # The slot is applied once: the next plan leaves the spec alone.
    service = parse_service(kube.objects[("LLMService", "chat")])
    assert schedule_step(service, clock(), desired.status) is None


def test_observe_pod_reads_conditions_annotations_and_deletion() -> None:
    pod = {
        "metadata": {
            "name": "job-0-2",
            "uid": "u",
            "deletionTimestamp": "2026-11-23T12:00:00Z",
            "labels": {"tidal.dev/index": "0"},
            "annotations": {
                "tidal.dev/gpus": "0,1",
                "tidal.dev/attempt": "2",
                "tidal.dev/checkpoint": "s3://c",
                "tidal.dev/topology-achieved": "nvlink",
            },
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"},
                {"type": "Ready", "status": "True"},
            ],
        },
    }
    seen = observe_pod(pod)
    assert (seen.index, seen.attempt, seen.gpus, seen.tier) == (0, 2, "0,1", "nvlink")
    assert seen.terminating and seen.disrupted and seen.ready and not seen.live
    assert seen.checkpoint == "s3://c"


def test_every_crd_has_short_names_the_tidal_category_and_a_status_subresource() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in custom_resource_definitions()}
    assert {k: c["spec"]["names"]["shortNames"] for k, c in crds.items()} == {
        "LLMService": ["llmsvc"],
        "LLMBatchJob": ["llmjob"],
        "GPUTopology": ["gputopo"],
    }
    for crd in crds.values():
        assert crd["spec"]["names"]["categories"] == ["tidal"]
        assert "status" in crd["spec"]["versions"][0]["subresources"]
    assert crds["GPUTopology"]["spec"]["scope"] == "Cluster"
    scale = crds["LLMService"]["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas"


def test_kopf_logs_in_with_the_kubeconfigs_token_or_certificate(tmp_path: Path) -> None:
    """A ServiceAccount token (the operator in a pod, or a token kubeconfig) must reach kopf:
    without it kopf talks to the API server as system:anonymous."""
    from tidal.kubeclient import api_client  # noqa: PLC0415
    from tidal.operator.run import connection_info  # noqa: PLC0415

    def kubeconfig(user: dict[str, str]) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.kubeconfig"
        cluster = {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": cluster}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        }))  # fmt: skip
        return path

    with_token = connection_info(api_client(kubeconfig({"token": "abc.def"})).configuration)
    assert with_token.token == "abc.def"
    assert with_token.server == "https://127.0.0.1:6443"
    (tmp_path / "c.crt").write_text("x")
    (tmp_path / "c.key").write_text("x")
    user = {"client-certificate": str(tmp_path / "c.crt"), "client-key": str(tmp_path / "c.key")}
    with_cert = connection_info(api_client(kubeconfig(user)).configuration)
    assert with_cert.token is None
    assert with_cert.certificate_path == str(tmp_path / "c.crt")


def test_operator_manifests_cli_binds_its_role_to_its_service_account() -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from tidal.cli import app  # noqa: PLC0415

    result = CliRunner().invoke(app, ["operator", "manifests", "--namespace", "ops"])
    assert result.exit_code == 0, result.output
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.output)}
    assert ("CustomResourceDefinition", "gputopologies.tidal.dev") in objects
    account = objects["ServiceAccount", "tidal-operator"]
    binding = objects["ClusterRoleBinding", "tidal-operator"]
    assert account["metadata"]["namespace"] == "ops"
    assert binding["roleRef"]["name"] == "tidal-operator"
    assert ("ClusterRole", "tidal-operator") in objects
    assert ("ClusterRole", "tidal-worker") in objects
    assert ("ValidatingAdmissionPolicy", "tidal-worker-own-pod") in objects
    assert ("ValidatingAdmissionPolicyBinding", "tidal-worker-own-pod") in objects
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tidal-operator", "namespace": "ops"}
    ]


def test_the_workers_may_patch_pods_and_the_operator_may_only_bind_that_role() -> None:
    from tidal.operator.manifests import (  # noqa: PLC0415
        manifests,
        operator_cluster_role,
        worker_identity,
    )

    objects = {(o["kind"], o["metadata"]["name"]): o for o in manifests()}
    assert objects["ClusterRole", "tidal-worker"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}
    ]
    account, binding = worker_identity("team-a")
    assert (account["kind"], account["metadata"]) == (
        "ServiceAccount",
        {"name": "tidal-worker", "namespace": "team-a", "labels": account["metadata"]["labels"]},
    )
    assert binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tidal-worker"
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tidal-worker", "namespace": "team-a"}
    ]
    rules = operator_cluster_role()["rules"]
    pods = next(r for r in rules if r["resources"] == ["pods"])
    assert "patch" not in pods["verbs"]  # it binds the workers' role without holding it
    assert {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
            "verbs": ["bind"], "resourceNames": ["tidal-worker"]} in rules  # fmt: skip
    for resource in ("serviceaccounts", "rolebindings"):
        (rule,) = [r for r in rules if r["resources"] == [resource]]
        assert rule["verbs"] == ["create"]


def test_the_worker_policy_matches_tidal_worker_accounts_and_guards_its_own_pod() -> None:
    from tidal.operator.manifests import manifests  # noqa: PLC0415

    objects = {(o["kind"], o["metadata"]["name"]): o for o in manifests()}
    policy = objects["ValidatingAdmissionPolicy", "tidal-worker-own-pod"]
    binding = objects["ValidatingAdmissionPolicyBinding", "tidal-worker-own-pod"]
    assert binding["spec"] == {"policyName": "tidal-worker-own-pod", "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert (rule["operations"], rule["resources"]) == (["UPDATE"], ["pods", "pods/*"])
    (who,) = spec["matchConditions"]
    assert "startsWith('system:serviceaccount:')" in who["expression"]
    assert "endsWith(':tidal-worker')" in who["expression"]
    expressions = " ".join(v["expression"] for v in spec["variables"] + spec["validations"])
    for needle in (
        "authentication.kubernetes.io/pod-name",
        "authentication.kubernetes.io/pod-uid",
        "!has(request.subResource) || request.subResource == ''",
        "object.spec == oldObject.spec",
        "'tidal.dev/checkpoint'",
    ):
        assert needle in expressions
    assert all(v.get("message") or v.get("messageExpression") for v in spec["validations"])

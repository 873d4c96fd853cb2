"""The operator against a hostile user (and a hostile API server): what a spec may not forge,
what must be refused, and that every failure shows on the object and stops or retries."""

from __future__ import annotations

import datetime as dt
from typing import Any

import kopf
import pytest

from tests.test_operator import NOW, FakeClock, MemoryKube, job_obj, replica, service_obj, worker
from tidal.kubeclient import KubeApiError
from tidal.operator.crds import (
    custom_resource_definitions,
    parse_priority_classes,
)
from tidal.operator.desired import (
    UNSCHEDULABLE_GRACE_S,
    Event,
    describe_pods,
    needs_tick,
    plan_job,
    plan_service,
)
from tidal.operator.handlers import CLEANUP_TIMEOUT_S, _reconcile, cleanup_verdict
from tidal.operator.reconciler import ReconcileError, Reconciler
from tidal.operator.spec import (
    SpecError,
    observe_pod,
    parse_job,
    parse_service,
)

FORGED = {
    "tidal.dev/reservation": '{"node": "n1", "gpus": [0, 1, 2, 3]}',
    "tidal.dev/gpus": "0,1,2,3",
    "scheduler.tidal.dev/anything": "x",
    "kubernetes.io/hostname": "n1",
    "k8s.io/x": "y",
}
ALLOWED = {"team": "search", "app.kubernetes.io/part-of": "chat", "example.com/owner": "me"}


def _crd_spec(kind: str) -> dict[str, Any]:
    crds = {c["spec"]["names"]["kind"]: c for c in custom_resource_definitions()}
    root = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec: dict[str, Any] = root["properties"]["spec"]
    return spec


def _recorder() -> tuple[list[Event], Any]:
    events: list[Event] = []
    return events, lambda _obj, event: events.append(event)


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def _ago(seconds: int) -> str:
    now = dt.datetime.fromisoformat(NOW.replace("Z", "+00:00"))
    return (now - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- A: reserved pod metadata ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LLMService", "LLMBatchJob"])
def test_reserved_pod_metadata_keys_are_never_copied_onto_worker_pods(kind: str) -> None:
    metadata = {
        "labels": {"tidal.dev/llmservice": "victim", "tidal.dev/index": "7", **ALLOWED},
        "annotations": {**FORGED, **ALLOWED},
    }
    if kind == "LLMService":
        plan = plan_service(parse_service(service_obj(1, podMetadata=metadata)), [], {}, {}, NOW)
    else:
        plan = plan_job(parse_job(job_obj(1, podMetadata=metadata)), [], {}, NOW)
    (pod,) = plan.create
    labels, notes = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert "tidal.dev/llmservice" not in labels or labels["tidal.dev/llmservice"] == "chat"
    assert labels["tidal.dev/index"] == "0"
    for key in FORGED:
        assert key not in notes and key not in labels, key
    for key, value in ALLOWED.items():
        assert labels[key] == value and notes[key] == value
    (warning,) = [e for e in plan.events if e.reason == "ReservedPodMetadata"]
    assert "tidal.dev/reservation" in warning.message and warning.type == "Warning"


def test_the_crds_reserve_the_tidal_and_kubernetes_prefixes_in_pod_metadata() -> None:
    for kind in ("LLMService", "LLMBatchJob"):
        meta = _crd_spec(kind)["properties"]["podMetadata"]["properties"]
        for field in ("labels", "annotations"):
            rules = " ".join(r["rule"] for r in meta[field]["x-kubernetes-validations"])
            assert "tidal" in rules and "kubernetes" in rules and "k8s" in rules


def test_a_pod_that_only_carries_the_owner_label_is_not_counted_as_a_replica() -> None:
    """Someone who may create pods labels one tidal.dev/llmservice=chat: the service must
    neither count it as a replica nor delete it as a surplus one (no fight over it)."""
    kube = MemoryKube(service_obj(1))
    intruder = {
        "metadata": {
            "name": "intruder",
            "uid": "x",
            "labels": {"tidal.dev/llmservice": "chat", "tidal.dev/index": "0"},
            "ownerReferences": [
                {"apiVersion": "tidal.dev/v1alpha1", "kind": "LLMBatchJob", "name": "job",
                 "uid": "job-uid", "controller": True},
            ],
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running"},
    }  # fmt: skip
    kube.pods["intruder"] = intruder
    Reconciler(kube).reconcile("LLMService", "ns", "chat")
    assert sorted(kube.pods) == ["chat-0", "intruder"]
    assert Reconciler.owner_of(intruder) == ("LLMBatchJob", "default", "job")


# -- B: rack and unschedulable pods ------------------------------------------------------------
def test_rack_is_refused_for_workloads_which_are_never_gangs() -> None:
    for kind in ("LLMService", "LLMBatchJob"):
        assert "rack" not in _crd_spec(kind)["properties"]["topology"]["properties"]["tier"]["enum"]
    stored = service_obj(1, topology={"mode": "guaranteed", "tier": "rack"})  # before the enum
    with pytest.raises(SpecError, match=r"spec\.topology\.tier: 'rack'.*gangs"):
        parse_service(stored)


def _unschedulable_pod(reason: str, since: str) -> dict[str, Any]:
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. " + "x" * 2000
    return {
        "metadata": {"name": "chat-1", "uid": "u1", "labels": {"tidal.dev/index": "1"}},
        "spec": {},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": reason,
                 "message": message, "lastTransitionTime": since},
            ],
        },
    }  # fmt: skip


@pytest.mark.parametrize("reason", ["Unschedulable", "SchedulerError"])
def test_a_replica_unschedulable_past_the_grace_shows_the_schedulers_message(reason: str) -> None:
    service = parse_service(service_obj(2))
    fresh = observe_pod(_unschedulable_pod(reason, _ago(5)))
    assert fresh.unschedulable and fresh.scheduling_message.startswith("0/2 nodes")
    status = plan_service(service, [replica(0), fresh], {}, {}, NOW).status
    assert _conditions(status)["Progressing"]["reason"] != "Unschedulable"  # a moment: no noise

    old = observe_pod(_unschedulable_pod(reason, _ago(UNSCHEDULABLE_GRACE_S + 1)))
    status = plan_service(service, [replica(0), old], {}, {}, NOW).status
    progressing = _conditions(status)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "Unschedulable")
    assert (
        "chat-1 (0/2 nodes are available: 2 Insufficient nvidia.com/gpu." in progressing["message"]
    )
    assert len(progressing["message"]) < 400  # the scheduler's message, cut
    degraded = _conditions(status)["Degraded"]
    assert degraded["status"] == "True" and "Insufficient nvidia.com/gpu" in degraded["message"]
    assert status["phase"] == "Degraded"


def test_a_batch_worker_unschedulable_past_the_grace_says_why_on_the_job() -> None:
    job = parse_job(job_obj(1))
    pod = _unschedulable_pod("SchedulerError", _ago(120))
    pod["metadata"].update(name="job-0-1", annotations={"tidal.dev/attempt": "1"})
    pod["metadata"]["labels"]["tidal.dev/index"] = "0"
    status = plan_job(job, [observe_pod(pod)], {}, NOW).status
    progressing = _conditions(status)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "Unschedulable")
    assert progressing["message"].startswith("job-0-1 (0/2 nodes are available")


def test_a_pod_waiting_for_its_preemption_victims_is_not_reported() -> None:
    pod = _unschedulable_pod("Unschedulable", _ago(300))
    pod["status"]["nominatedNodeName"] = "n1"
    status = plan_service(
        parse_service(service_obj(2)), [replica(0), observe_pod(pod)], {}, {}, NOW
    )
    assert _conditions(status.status)["Degraded"]["status"] == "False"


# -- C: names and the finalizer ----------------------------------------------------------------
def test_the_crds_bound_the_name_so_every_pod_label_fits() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in custom_resource_definitions()}
    for kind in ("LLMService", "LLMBatchJob"):
        root = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        (rule,) = root["x-kubernetes-validations"]
        assert rule["rule"] == "self.metadata.name.size() <= 63"
    with pytest.raises(SpecError, match=r"metadata\.name: 64 characters"):
        parse_job({**job_obj(1), "metadata": {"name": "j" * 64, "namespace": "ns"}})


def test_cleanup_of_an_object_whose_name_is_no_label_value_finds_its_pods_by_owner() -> None:
    """The old finalizer listed by an invalid selector (a 400) and retried forever."""
    long = "j" * 70
    obj = {**job_obj(1), "metadata": {"name": long, "namespace": "ns", "uid": "long-uid"}}
    kube = MemoryKube(obj)
    mine = parse_job(job_obj(1))  # a pod made for the long-named job, owned by its uid
    pod = plan_job(mine, [], {}, NOW).create[0]
    pod["metadata"]["name"] = "long-0-1"
    pod["metadata"]["ownerReferences"][0].update(name=long, uid="long-uid")
    kube.pods["long-0-1"] = pod
    kube.pods["other"] = {"metadata": {"name": "other", "labels": {}}}
    remaining = Reconciler(kube).cleanup("LLMBatchJob", "ns", long, "long-uid")
    assert remaining == 1 and sorted(kube.pods) == ["other"]


def test_the_finalizer_gives_up_on_a_permanent_error_or_after_its_timeout() -> None:
    assert cleanup_verdict(0, None, 1.0) == "done"
    assert cleanup_verdict(2, None, 1.0) == "wait"
    assert cleanup_verdict(0, KubeApiError(503, "down"), 1.0) == "wait"
    assert cleanup_verdict(0, KubeApiError(400, "invalid selector"), 1.0) == "give-up"
    assert cleanup_verdict(3, None, CLEANUP_TIMEOUT_S) == "give-up"


# -- D: failures on the object, permanent or retried ------------------------------------------
class RejectingKube(MemoryKube):
    def __init__(self, *objects: dict[str, Any], status: int, message: str) -> None:
        super().__init__(*objects)
        self.reject = KubeApiError(status, message)
        self.attempts = 0

    def create_pod(self, pod: dict[str, Any]) -> bool:
        self.attempts += 1
        raise self.reject


def test_a_pod_the_api_server_rejects_shows_on_the_object_and_is_not_retried() -> None:
    message = 'create pod ns/chat-0: Pod "chat-0" is invalid: spec.containers[0].image: bad'
    kube = RejectingKube(service_obj(2), status=422, message=message)
    events, sink = _recorder()
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"), sink)
    with pytest.raises(ReconcileError) as raised:
        reconciler.reconcile("LLMService", "ns", "chat", retry_refused=True)
    assert raised.value.permanent
    status = kube.objects[("LLMService", "chat")]["status"]
    assert status["phase"] == "Degraded"
    degraded = _conditions(status)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "PodRejected")
    assert "is invalid" in degraded["message"] and degraded["observedGeneration"] == 3
    assert "PodRejected" in [e.reason for e in events if e.type == "Warning"]
    assert kube.attempts == 1  # the second replica would be refused alike
    # Timers and pod events leave the refused generation alone…
    assert reconciler.reconcile("LLMService", "ns", "chat") is None
    assert kube.attempts == 1
    # …a new spec tries again.
    kube.objects[("LLMService", "chat")]["metadata"]["generation"] = 4
    with pytest.raises(ReconcileError):
        reconciler.reconcile("LLMService", "ns", "chat")
    assert kube.attempts == 2


def test_a_quota_or_server_error_is_retried_and_still_shows_on_the_object() -> None:
    kube = RejectingKube(job_obj(1), status=403, message="pods is forbidden: exceeded quota")
    events, sink = _recorder()
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"), sink)
    with pytest.raises(ReconcileError) as raised:
        reconciler.reconcile("LLMBatchJob", "ns", "job")
    assert not raised.value.permanent and raised.value.delay > 0
    status = kube.objects[("LLMBatchJob", "job")]["status"]
    assert _conditions(status)["Degraded"]["reason"] == "ApiError"
    assert [e.reason for e in events] == ["ApiError"]
    with pytest.raises(ReconcileError):
        reconciler.reconcile("LLMBatchJob", "ns", "job")  # not refused: the timer retries
    assert kube.attempts == 2


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"autoscaling": {"maxReplicas": 2, "timeZone": "Mars/Base"}}, "spec.autoscaling.timeZone"),
        ({"resources": {"cpu": "lots"}}, "spec.resources.cpu"),
        ({"resources": {"memory": "0"}}, "spec.resources.memory"),
        ({"priorityClassName": "system-node-critical"}, "spec.priorityClassName"),
    ],
)
def test_an_invalid_spec_shows_on_the_object_naming_the_field(
    spec: dict[str, Any], field: str
) -> None:
    kube = MemoryKube(service_obj(1, **spec))
    events, sink = _recorder()
    with pytest.raises(ReconcileError) as raised:
        Reconciler(kube, FakeClock("2026-11-23T12:00:00"), sink).reconcile(
            "LLMService", "ns", "chat"
        )
    assert raised.value.permanent and not kube.pods
    status = kube.objects[("LLMService", "chat")]["status"]
    degraded = _conditions(status)["Degraded"]
    assert (status["phase"], degraded["reason"]) == ("Degraded", "InvalidSpec")
    assert degraded["message"].startswith(f"{field}: ")
    assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]


def test_a_fixed_spec_clears_the_degraded_condition() -> None:
    kube = MemoryKube(service_obj(1, resources={"cpu": "lots"}))
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"))
    with pytest.raises(ReconcileError):
        reconciler.reconcile("LLMService", "ns", "chat")
    kube.objects[("LLMService", "chat")]["spec"]["resources"] = {"cpu": "2"}
    kube.objects[("LLMService", "chat")]["metadata"]["generation"] = 4
    reconciler.reconcile("LLMService", "ns", "chat")
    status = kube.objects[("LLMService", "chat")]["status"]
    assert _conditions(status)["Degraded"]["status"] == "False" and len(kube.pods) == 1


@pytest.mark.parametrize(
    ("status", "message", "permanent"),
    [
        (422, "is invalid", True),
        (400, "bad request", True),
        (403, 'no PriorityClass with name "x" was found', True),
        (403, "exceeded quota: gpu", False),
        (409, "exists", False),
        (429, "too many requests", False),
        (500, "etcd", False),
        (0, "connection refused", False),
    ],
)
def test_api_errors_are_permanent_or_retried(status: int, message: str, permanent: bool) -> None:
    assert KubeApiError(status, message).permanent is permanent


def test_the_kopf_layer_stops_on_permanent_failures_and_delays_the_others() -> None:
    class Failing(Reconciler):
        def __init__(self, error: Exception) -> None:
            super().__init__(MemoryKube())
            self.error = error

        def reconcile(self, *args: Any, **kwargs: Any) -> None:
            raise self.error

    with pytest.raises(kopf.PermanentError):
        _reconcile(
            Failing(ReconcileError("InvalidSpec", "x", permanent=True)), "LLMService", "n", "m"
        )
    with pytest.raises(kopf.TemporaryError) as temporary:
        _reconcile(Failing(ReconcileError("ApiError", "x", False, 7)), "LLMService", "n", "m")
    assert temporary.value.delay == 7
    with pytest.raises(kopf.TemporaryError):
        _reconcile(Failing(KubeApiError(503, "down")), "LLMService", "n", "m")


def test_kopf_posts_its_handler_failures_as_events() -> None:
    from tidal.operator.handlers import register  # noqa: PLC0415

    registry = kopf.OperatorRegistry()
    register(registry, Reconciler(MemoryKube()))
    settings = kopf.OperatorSettings()
    for handler in registry._activities.get_all_handlers():
        if handler.id.endswith("configure"):
            configure: Any = handler.fn  # kopf's stub wants every kwarg kopf would pass
            configure(settings=settings)
    assert settings.posting.enabled and settings.posting.loggers
    assert settings.posting.level <= 30  # warnings and errors


def test_the_crds_check_quantities_and_image() -> None:
    resources = _crd_spec("LLMService")["properties"]["resources"]["properties"]
    for field in ("cpu", "memory"):
        (rule,) = resources[field]["x-kubernetes-validations"]
        assert "isQuantity(self)" in rule["rule"]
    assert _crd_spec("LLMService")["properties"]["image"]["pattern"] == r"^\S+$"


# -- E: priority classes -----------------------------------------------------------------------
def test_only_tidals_priority_classes_or_configured_ones_are_allowed() -> None:
    assert _crd_spec("LLMService")["properties"]["priorityClassName"]["enum"] == [
        "tidal-online",
        "tidal-batch",
    ]
    assert _crd_spec("LLMBatchJob")["properties"]["priorityClassName"]["enum"] == ["tidal-batch"]
    with pytest.raises(SpecError, match="'system-node-critical' is not allowed"):
        parse_job(job_obj(1, priorityClassName="system-node-critical"))
    with pytest.raises(SpecError, match="'tidal-online' is not allowed for LLMBatchJob"):
        parse_job(job_obj(1, priorityClassName="tidal-online"))  # batch work would preempt
    extra = parse_priority_classes("team-a, team-b")
    assert extra == ("team-a", "team-b")
    job = parse_job(job_obj(1, priorityClassName="team-b"), extra)
    assert job.workload.priority_class == "team-b"
    crds = {c["spec"]["names"]["kind"]: c for c in custom_resource_definitions(extra)}
    schema = crds["LLMBatchJob"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    enum = schema["properties"]["spec"]["properties"]["priorityClassName"]["enum"]
    assert enum == ["tidal-batch", "team-a", "team-b"]


def test_the_reconciler_uses_the_configured_priority_classes() -> None:
    kube = MemoryKube(job_obj(1, priorityClassName="team-a"))
    Reconciler(kube, extra_priority_classes=("team-a",)).reconcile("LLMBatchJob", "ns", "job")
    assert kube.pods["job-0-1"]["spec"]["priorityClassName"] == "team-a"


# -- F: bounded messages, named pods -----------------------------------------------------------
def test_degraded_messages_stay_bounded_at_a_thousand_replicas() -> None:
    named = [(f"chat-{i}", "0/2 nodes are available") for i in range(1000)]
    text = describe_pods(named)
    assert text.endswith("and 997 more") and text.count("0/2 nodes") == 3
    pods = [replica(i, node="", ready=False, unschedulable=True) for i in range(1000)]
    status = plan_service(parse_service(service_obj(1000)), pods, {}, {}, NOW).status
    assert all(len(c["message"]) < 2048 for c in status["conditions"])
    assert "1000 cannot be placed" in _conditions(status)["Degraded"]["message"]


def test_a_worker_whose_pod_vanished_unseen_is_named_in_its_preempted_event() -> None:
    job = parse_job(job_obj(1))
    status = {"workers": [{"index": 0, "attempt": 3, "uid": "gone"}]}
    plan = plan_job(job, [], status, NOW)
    (event,) = [e for e in plan.events if e.reason == "Preempted"]
    assert "(job-0-3)" in event.message and "()" not in event.message
    assert worker(0).name == "job-0-1"


def test_a_failure_already_on_the_object_is_not_posted_again() -> None:
    """The create handler and the first timer tick race on a new object; a restarted operator
    resumes it: one Event, not one per attempt."""
    kube = MemoryKube(service_obj(1, resources={"cpu": "lots"}))
    events, sink = _recorder()
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"), sink)
    for _ in range(3):
        with pytest.raises(ReconcileError):
            reconciler.reconcile("LLMService", "ns", "chat", retry_refused=True)
    assert [e.reason for e in events] == ["InvalidSpec"]


class CountingKube(MemoryKube):
    def __init__(self, *objects: dict[str, Any]) -> None:
        super().__init__(*objects)
        self.lists = self.patches = 0

    def owned_pods(self, label: str, namespace: str, name: str) -> list[dict[str, Any]]:
        self.lists += 1
        return super().owned_pods(label, namespace, name)

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches += 1
        super().patch_status(kind, namespace, name, status)


def test_an_idle_job_costs_its_timer_no_pod_list_and_no_status_write() -> None:
    """F. The timer listed and planned all 1,024 workers and rewrote the status every 15 s."""
    kube = CountingKube(job_obj(1024))
    elapsed = [0.0]
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"), monotonic=lambda: elapsed[0])
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    for pod in kube.pods.values():
        pod["spec"]["nodeName"] = "n1"
        pod["status"] = {"phase": "Running"}
    reconciler.reconcile("LLMBatchJob", "ns", "job")  # what the pod events would do
    body = kube.objects[("LLMBatchJob", "job")]
    assert _conditions(body["status"])["Progressing"]["reason"] == "WorkersRunning"
    lists, patches = kube.lists, kube.patches
    reconciler.reconcile("LLMBatchJob", "ns", "job")  # nothing changed: no status write
    assert (kube.lists, kube.patches) == (lists + 1, patches)
    for _ in range(19):  # 19 ticks of 15 s
        elapsed[0] += 15
        reconciler.tick("LLMBatchJob", "ns", "job", kube.objects[("LLMBatchJob", "job")])
    assert kube.lists == lists + 1
    elapsed[0] += 15  # the resync, every RESYNC_S
    reconciler.tick("LLMBatchJob", "ns", "job", kube.objects[("LLMBatchJob", "job")])
    assert kube.lists == lists + 2


def test_the_timer_still_applies_a_due_schedule_entry_and_watches_a_scale_up() -> None:
    obj = service_obj(
        1, autoscaling={"maxReplicas": 4, "schedule": [{"at": "08:00", "replicas": 3}]}
    )
    kube = CountingKube(obj)
    clock = FakeClock("2026-11-23T07:00:00")
    reconciler = Reconciler(kube, clock, monotonic=lambda: 0.0)
    reconciler.reconcile("LLMService", "ns", "chat")  # 07:00: yesterday's entry, 3
    assert len(kube.pods) == 3
    # Pods not ready yet: Progressing, so every tick reconciles.
    lists = kube.lists
    reconciler.tick("LLMService", "ns", "chat", kube.objects[("LLMService", "chat")])
    assert kube.lists == lists + 1
    for pod in kube.pods.values():
        pod["spec"]["nodeName"] = "n1"
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        pod["metadata"]["annotations"]["tidal.dev/spec-hash"] = parse_service(
            kube.objects[("LLMService", "chat")]
        ).workload.spec_hash()
    reconciler.reconcile("LLMService", "ns", "chat")
    kube.set_replicas("ns", "chat", 1)  # kubectl scale; its update event reconciles
    reconciler.reconcile("LLMService", "ns", "chat")
    reconciler.reconcile("LLMService", "ns", "chat")  # the deleted pods' events
    lists = kube.lists
    reconciler.tick("LLMService", "ns", "chat", kube.objects[("LLMService", "chat")])
    assert kube.lists == lists  # settled: nothing to do
    clock.now = clock.now.replace(day=24, hour=8, minute=1)  # the next day's 08:00 entry
    reconciler.tick("LLMService", "ns", "chat", kube.objects[("LLMService", "chat")])
    assert kube.objects[("LLMService", "chat")]["spec"]["replicas"] == 3


def test_the_timer_retries_a_transient_failure_of_a_settled_object() -> None:
    body: dict[str, Any] = {
        "metadata": {"generation": 2},
        "status": {
            "phase": "Degraded",
            "conditions": [
                {"type": "Progressing", "status": "True", "reason": "Stable",
                 "observedGeneration": 2},
                {"type": "Degraded", "status": "True", "reason": "ApiError",
                 "observedGeneration": 2},
            ],
        },
    }  # fmt: skip
    assert needs_tick(body)
    body["status"]["conditions"][1]["reason"] = "InvalidSpec"
    assert not needs_tick(body)  # refused: only a new spec tries again


def _running(kube: MemoryKube, node: str) -> None:
    for pod in kube.pods.values():
        pod["spec"]["nodeName"] = node
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}


def test_workers_on_a_deleted_node_are_lost_at_once_and_resume_elsewhere() -> None:
    """F. Until the pod garbage collector noticed, they read Running on a node that is gone."""
    kube = MemoryKube(job_obj(2))
    events, sink = _recorder()
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"), sink)
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    _running(kube, "n1")
    kube.pods["job-1-1"]["spec"]["nodeName"] = "n2"
    kube.pods["job-0-1"]["metadata"]["annotations"]["tidal.dev/checkpoint"] = "s3://out/c/0"
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    assert reconciler.node_deleted("n1") == [("LLMBatchJob", "ns", "job")]
    assert ("job-0-1", 0) in kube.deleted  # at once: no kubelet will confirm a graceful one
    assert sorted(kube.pods) == ["job-0-2", "job-1-1"]
    status = kube.objects[("LLMBatchJob", "job")]["status"]
    assert (status["preemptions"], status["failed"]) == (1, 0)
    worker0 = status["workers"][0]
    assert (worker0["state"], worker0["node"], worker0["checkpoint"]) == (
        "Waiting",  # its new attempt is being created
        "",
        "s3://out/c/0",
    )
    (lost,) = [e for e in events if e.reason == "NodeLost"]
    assert "job-0-1" in lost.message and "n1" in lost.message


def test_a_replica_on_a_deleted_node_is_replaced_at_once() -> None:
    kube = MemoryKube(service_obj(1))
    reconciler = Reconciler(kube, FakeClock("2026-11-23T12:00:00"))
    reconciler.reconcile("LLMService", "ns", "chat")
    _running(kube, "n1")
    reconciler.node_deleted("n1")
    assert ("chat-0", 0) in kube.deleted and list(kube.pods) == ["chat-1"]
    reconciler.node_added("n1")  # a node of that name again: its new pods are not lost
    _running(kube, "n1")
    reconciler.reconcile("LLMService", "ns", "chat")
    assert list(kube.pods) == ["chat-1"]

"""The operator on the real control plane: CRDs and CEL rules in the API server, pods scheduled
by tidal-scheduler through the extender, preemption and resumption, scale, restarts, deletion.

Nodes are two DGX-1V (hybrid cube-mesh, NVLink quads {0,1,2,3} and {4,5,6,7}): 16 GPUs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.helpers import binaries_or_skip, fresh_namespace, wait_for
from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.binaries import Binaries
from tidal.devcluster.nodes import node_names
from tidal.topology import preset_names

NODES = node_names(2, ["dgx1-v100"], prefix="op")
EXAMPLES = Path(__file__).parents[2] / "examples"
GROUP, VERSION = "tidal.dev", "v1alpha1"
PRESET_DIR = Path(__file__).parents[2] / "tidal" / "topology" / "preset_data"


@pytest.fixture(scope="module")
def op_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        ClusterOptions(
            workdir=tmp_path_factory.mktemp("operator-cluster"),
            controller_manager=True,
            run_extender=True,
            run_operator=True,
        ),
        binaries_or_skip(),
    )
    try:
        local.start()
        local.wait_nodes_ready(local.add_gpu_nodes(NODES))
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster(op_cluster: LocalCluster) -> LocalCluster:
    """Named `cluster` so a failure report carries the control-plane and operator logs."""
    return op_cluster


@pytest.fixture
def ns(core: Any) -> Iterator[str]:
    yield from fresh_namespace(core, "op")


def kubectl(cluster: LocalCluster, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    binaries = cluster.binaries
    assert isinstance(binaries, Binaries)
    return subprocess.run(
        [str(binaries.path("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def service(name: str, tp: int, replicas: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "llama-70b", "uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
            "tensorParallel": tp,
            "replicas": replicas,
            "resources": {"cpu": "1", "memory": "1Gi"},
            **spec,
        },
    }


def batch_job(name: str, tp: int, workers: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMBatchJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "llama-8b", "uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
            "tensorParallel": tp,
            "parallelism": workers,
            "input": {"uri": "s3://in/docs/"},
            "output": {"uri": "s3://out/summaries/"},
            "resources": {"cpu": "1", "memory": "1Gi"},
            **spec,
        },
    }


def create(custom: Any, ns: str, obj: dict[str, Any]) -> None:
    plural = "llmservices" if obj["kind"] == "LLMService" else "llmbatchjobs"
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, obj)


def get(custom: Any, ns: str, plural: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
    return obj


def pods_of(core: Any, ns: str, label: str, name: str) -> list[Any]:
    return list(core.list_namespaced_pod(ns, label_selector=f"tidal.dev/{label}={name}").items)


def live(pods: list[Any]) -> list[Any]:
    return [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None and p.status.phase in ("Pending", "Running")
    ]


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}


BAD_OBJECTS = [
    ("tensor-parallel-3", service("bad-tp", 3, 1), "spec.tensorParallel: Unsupported value: 3"),
    (
        "min-above-max",
        service("bad-bounds", 1, 1, autoscaling={"minReplicas": 5, "maxReplicas": 2}),
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "schedule-outside-bounds",
        service(
            "bad-schedule",
            1,
            1,
            autoscaling={"maxReplicas": 2, "schedule": [{"at": "08:00", "replicas": 9}]},
        ),
        "schedule replicas must lie within [minReplicas, maxReplicas]",
    ),
    (
        "schedule-time",
        service(
            "bad-time",
            1,
            1,
            autoscaling={"maxReplicas": 2, "schedule": [{"at": "25:00", "replicas": 1}]},
        ),
        "spec.autoscaling.schedule[0].at",
    ),
    (
        "unknown-topology-mode",
        service("bad-mode", 1, 1, topology={"mode": "strict"}),
        'spec.topology.mode: Unsupported value: "strict"',
    ),
    (
        "model-uri",
        {
            **service("bad-uri", 1, 1),
            "spec": {**service("x", 1, 1)["spec"], "model": {"name": "m", "uri": "/local/path"}},
        },
        "spec.model.uri",
    ),
    (
        "same-input-and-output",
        batch_job("bad-io", 1, 1, output={"uri": "s3://in/docs/"}),
        "output.uri must differ from input.uri",
    ),
    (
        "output-differs-only-by-a-slash",
        batch_job("bad-slash", 1, 1, output={"uri": "s3://in/docs"}),
        "output.uri must differ from input.uri",
    ),
    (
        "output-inside-input",
        batch_job("bad-nested", 1, 1, output={"uri": "s3://in/docs/out/"}),
        "output.uri must differ from input.uri",
    ),
    (
        "uri-with-a-space",
        batch_job("bad-space", 1, 1, input={"uri": "hf:// org/m"}),
        "spec.input.uri",
    ),
    (
        "file-uri-to-a-system-path",
        batch_job("bad-file", 1, 1, output={"uri": "file:///etc/shadow"}),
        "a file:// URI must be an absolute path",
    ),
    (
        "uri-with-dot-dot",
        batch_job("bad-dots", 1, 1, output={"uri": "s3://out/../in/docs/"}),
        "must not contain '.' or '..' path segments",
    ),
    (
        # A. The extender trusts tidal.dev/reservation: no user may forge one through the operator.
        "forged-reservation",
        service("bad-note", 1, 1, podMetadata={"annotations": {"tidal.dev/reservation": "{}"}}),
        'spec.podMetadata.annotations: Invalid value: "object": key tidal.dev/reservation is '
        "reserved",
    ),
    (
        "owner-label-of-another-service",
        service("bad-label", 1, 1, podMetadata={"labels": {"tidal.dev/llmservice": "victim"}}),
        "key tidal.dev/llmservice is reserved",
    ),
    (
        "kubernetes-reserved-key",
        batch_job("bad-k8s", 1, 1, podMetadata={"labels": {"kubernetes.io/hostname": "n1"}}),
        "key kubernetes.io/hostname is reserved",
    ),
    (
        "invalid-label-key",
        service("bad-key", 1, 1, podMetadata={"labels": {"not a key": "x"}}),
        'spec.podMetadata.labels: Invalid value: "object": keys must be qualified names',
    ),
    (
        "invalid-label-value",
        service("bad-value", 1, 1, podMetadata={"labels": {"team": "a b"}}),
        "spec.podMetadata.labels.team",
    ),
    (
        # B. Each replica is one pod; the extender refuses 'rack' for a single pod.
        "rack-tier",
        service("bad-rack", 1, 1, topology={"mode": "guaranteed", "tier": "rack"}),
        'spec.topology.tier: Unsupported value: "rack"',
    ),
    (
        # C. The name is its pods' label value (at most 63 characters).
        "name-too-long",
        service("n" * 64, 1, 1),
        "metadata.name must be at most 63 characters",
    ),
    (
        # D. A bad quantity is refused here, not as a 422 on the operator's pod create.
        "cpu-not-a-quantity",
        service("bad-cpu", 1, 1, resources={"cpu": "lots", "memory": "1Gi"}),
        "spec.resources.cpu: Invalid value",
    ),
    (
        "memory-zero",
        service("bad-mem", 1, 1, resources={"cpu": "1", "memory": "0"}),
        "must be a positive quantity such as 512Mi or 32Gi",
    ),
    (
        "image-with-a-space",
        service("bad-image", 1, 1, image="busy box"),
        "spec.image",
    ),
    (
        # E. Free text would let batch work run at system-node-critical.
        "system-priority-class",
        batch_job("bad-prio", 1, 1, priorityClassName="system-node-critical"),
        'spec.priorityClassName: Unsupported value: "system-node-critical"',
    ),
    (
        "batch-job-at-online-priority",
        batch_job("bad-online", 1, 1, priorityClassName="tidal-online"),
        'spec.priorityClassName: Unsupported value: "tidal-online"',
    ),
    (
        "no-input",
        {
            **batch_job("bad-missing", 1, 1),
            "spec": {"model": {"name": "m", "uri": "hf://a/b"}, "output": {"uri": "s3://o/"}},
        },
        "spec.input: Required value",
    ),
]


@pytest.mark.parametrize(("case", "obj", "message"), BAD_OBJECTS, ids=[c[0] for c in BAD_OBJECTS])
def test_kubectl_apply_of_a_bad_object_is_rejected_naming_the_field(
    cluster: LocalCluster, ns: str, case: str, obj: dict[str, Any], message: str
) -> None:
    result = kubectl(cluster, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(obj))
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("preset", preset_names())
def test_gputopology_accepts_every_preset_without_pruning_a_field(custom: Any, preset: str) -> None:
    spec = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    name = f"e2e-{preset}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUTopology",
        "metadata": {"name": name},
        "spec": spec,
    }
    created = custom.create_cluster_custom_object(GROUP, VERSION, "gputopologies", body)
    try:
        assert created["spec"] == spec
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "gputopologies", name)


def test_immutable_batch_fields_cannot_change(cluster: LocalCluster, custom: Any, ns: str) -> None:
    create(custom, ns, batch_job("frozen", 1, 1))
    patched = batch_job("frozen", 2, 1)
    result = kubectl(cluster, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(patched))
    assert result.returncode != 0
    assert "spec.tensorParallel: Invalid value" in result.stderr
    assert "is immutable" in result.stderr


GOOD_OBJECTS = [
    service(
        "a" * 63,  # the longest name
        1,
        1,
        resources={"cpu": 2, "memory": "1.5Gi"},
        podMetadata={
            "labels": {"app.kubernetes.io/part-of": "chat", "team": "search"},
            "annotations": {
                "example.com/owner": "me",
                "cluster-autoscaler.kubernetes.io/x": "keep",
            },
        },
        priorityClassName="tidal-batch",
    ),
    service("milli", 1, 1, resources={"cpu": "500m", "memory": "512Mi"}),
    batch_job("files", 1, 1, input={"uri": "file:///data/in/"}, output={"uri": "s3://in/docs2/"}),
]


@pytest.mark.parametrize("obj", GOOD_OBJECTS, ids=["edges", "milli", "files"])
def test_objects_at_the_edges_of_the_rules_are_accepted(
    cluster: LocalCluster, ns: str, obj: dict[str, Any]
) -> None:
    text = yaml.safe_dump(obj)
    result = kubectl(cluster, "apply", "--dry-run=server", "-n", ns, "-f", "-", stdin=text)
    assert result.returncode == 0, result.stderr


def test_examples_are_accepted(cluster: LocalCluster, ns: str) -> None:
    for example in ("llmservice.yaml", "llmbatchjob.yaml"):
        text = (EXAMPLES / example).read_text()
        result = kubectl(cluster, "apply", "--dry-run=server", "-n", ns, "-f", "-", stdin=text)
        assert result.returncode == 0, result.stderr


def test_service_lifecycle_create_scale_status_delete(
    cluster: LocalCluster, core: Any, custom: Any, ns: str
) -> None:
    create(custom, ns, service("chat", 4, 1, topology={"mode": "guaranteed", "tier": "nvlink"}))

    def ready(want: int) -> Any:
        obj = get(custom, ns, "llmservices", "chat")
        status = obj.get("status") or {}
        return obj if status.get("readyReplicas") == want == status.get("replicas") else None

    obj = wait_for(lambda: ready(1), "chat to have 1 ready replica", 60)
    (pod,) = live(pods_of(core, ns, "llmservice", "chat"))
    assert pod.spec.scheduler_name == "tidal-scheduler"
    assert pod.spec.priority_class_name == "tidal-online"
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"
    assert pod.metadata.annotations["tidal.dev/topology-mode"] == "guaranteed"
    assert pod.metadata.owner_references[0].kind == "LLMService"
    placement = obj["status"]["placements"][0]
    assert placement["node"] == pod.spec.node_name
    assert {int(g) for g in placement["gpus"].split(",")} in ({0, 1, 2, 3}, {4, 5, 6, 7})
    assert placement["tier"] == "nvlink"
    assert {c["type"]: c["status"] for c in obj["status"]["conditions"]}["Ready"] == "True"

    listing = kubectl(cluster, "get", "tidal", "-n", ns)
    assert listing.returncode == 0, listing.stderr
    assert "llmservice.tidal.dev/chat" in listing.stdout
    assert "Ready" in listing.stdout

    scaled = kubectl(cluster, "scale", "-n", ns, "llmsvc/chat", "--replicas=2")
    assert scaled.returncode == 0, scaled.stderr
    wait_for(lambda: ready(2), "chat to scale to 2 ready replicas", 60)

    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", "chat")

    def gone() -> bool:
        remaining = custom.list_namespaced_custom_object(GROUP, VERSION, ns, "llmservices")
        return not remaining["items"] and not pods_of(core, ns, "llmservice", "chat")

    wait_for(gone, "chat and its pods to be deleted", 60)


def test_batch_job_completes(core: Any, custom: Any, ns: str) -> None:
    create(custom, ns, batch_job("short", 1, 2))
    # KWOK's stand-in for work done; podMetadata may not carry a tidal.dev/ key, so the test
    # annotates the running workers itself.
    notes = {"metadata": {"annotations": {"tidal.dev/kwok-complete-after": "2s"}}}

    def running() -> list[Any] | None:
        pods = [p for p in live(pods_of(core, ns, "llmbatchjob", "short"))]
        return pods if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) else None

    for pod in wait_for(running, "2 workers running", 60):
        core.patch_namespaced_pod(pod.metadata.name, ns, notes)

    def done() -> Any:
        status = get(custom, ns, "llmbatchjobs", "short").get("status") or {}
        return status if status.get("phase") == "Succeeded" else None

    status = wait_for(done, "job short to succeed", 60)
    assert status["succeeded"] == 2
    assert status["completionTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Complete"] == "True"


def test_schedule_peak_preempts_batch_workers_which_resume_from_their_checkpoints(
    cluster: LocalCluster, core: Any, custom: Any, ns: str
) -> None:
    # Batch work fills all 16 GPUs with four TP4 workers, each reporting a checkpoint.
    create(custom, ns, batch_job("fill", 4, 4, checkpointIntervalSeconds=60))

    def running(want: int) -> list[Any] | None:
        pods = [
            p for p in live(pods_of(core, ns, "llmbatchjob", "fill")) if p.status.phase == "Running"
        ]
        return pods if len(pods) == want else None

    for pod in wait_for(lambda: running(4), "4 batch workers running", 60):
        index = pod.metadata.labels["tidal.dev/index"]
        note = {"tidal.dev/checkpoint": f"s3://out/summaries/ckpt/{index}/step-40"}
        core.patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": note}})

    # The daily peak: one schedule entry all day asks for 2 TP4 replicas of an online service.
    peak = {"minReplicas": 0, "maxReplicas": 2, "schedule": [{"at": "00:00", "replicas": 2}]}
    create(custom, ns, service("peak", 4, 0, autoscaling=peak))

    def served() -> Any:
        obj = get(custom, ns, "llmservices", "peak")
        return obj if (obj.get("status") or {}).get("readyReplicas") == 2 else None

    obj = wait_for(served, "the peak service to get 2 ready replicas", 120)
    assert obj["spec"]["replicas"] == 2
    assert obj["status"]["scheduleSlot"].endswith("T00:00")

    def requeued() -> Any:
        status = get(custom, ns, "llmbatchjobs", "fill").get("status") or {}
        # A replacement is created only once its old pod is gone, so it may trail the count.
        restarted = [w for w in status.get("workers", ()) if w["attempt"] == 2]
        return status if status.get("preemptions") == 2 and len(restarted) == 2 else None

    status = wait_for(requeued, "2 preemptions counted and 2 workers restarted", 60)
    assert status["failed"] == 0
    resumed = [w for w in status["workers"] if w["attempt"] == 2]
    assert all(w["checkpoint"].endswith("step-40") for w in resumed)
    pending = {
        p.metadata.labels["tidal.dev/index"]: p
        for p in live(pods_of(core, ns, "llmbatchjob", "fill"))
        if p.metadata.annotations["tidal.dev/attempt"] == "2"
    }
    assert len(pending) == 2
    for index, pod in pending.items():
        assert env_of(pod)["TIDAL_RESUME_FROM"] == f"s3://out/summaries/ckpt/{index}/step-40"

    # The tide goes out: scaling the service to zero lets the resumed workers run again.
    assert kubectl(cluster, "scale", "-n", ns, "llmsvc/peak", "--replicas=0").returncode == 0
    wait_for(lambda: running(4), "all 4 batch workers running again", 90)


def test_operator_restart_mid_reconcile_duplicates_and_loses_nothing(
    cluster: LocalCluster, core: Any, custom: Any, ns: str
) -> None:
    create(custom, ns, batch_job("restart", 1, 6))
    cluster.restart("tidal-operator")  # while it is creating the workers' pods

    def six_running() -> list[Any] | None:
        pods = live(pods_of(core, ns, "llmbatchjob", "restart"))
        ok = len(pods) == 6 and all(p.status.phase == "Running" for p in pods)
        return pods if ok else None

    pods = wait_for(six_running, "6 workers running after the restart", 90)
    assert sorted(int(p.metadata.labels["tidal.dev/index"]) for p in pods) == list(range(6))
    all_pods = pods_of(core, ns, "llmbatchjob", "restart")
    assert len(all_pods) == 6, [p.metadata.name for p in all_pods]
    held: dict[str, set[int]] = {}
    for pod in pods:
        gpus = {int(g) for g in pod.metadata.annotations["tidal.dev/gpus"].split(",")}
        assert not gpus & held.get(pod.spec.node_name, set()), "a GPU was handed out twice"
        held.setdefault(pod.spec.node_name, set()).update(gpus)


def events_of(core: Any, ns: str, name: str, reason: str) -> list[Any]:
    selector = f"involvedObject.name={name},reason={reason}"
    return list(core.list_namespaced_event(ns, field_selector=selector).items)


def condition_of(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()}
    found: dict[str, Any] = conditions.get(kind, {})
    return found


def test_a_spec_error_shows_on_the_object_once_and_a_fixed_spec_recovers(
    core: Any, custom: Any, ns: str
) -> None:
    """D. timeZone cannot be checked by the API server: the operator says so on the object (a
    phase, a Degraded condition naming the field, an Event) and does not retry until the spec
    changes."""
    autoscaling = {"maxReplicas": 1, "timeZone": "Mars/Base"}
    create(custom, ns, service("mars", 1, 1, autoscaling=autoscaling))

    def degraded() -> Any:
        obj = get(custom, ns, "llmservices", "mars")
        cond = condition_of(obj, "Degraded")
        return obj if cond.get("reason") == "InvalidSpec" else None

    obj = wait_for(degraded, "mars to be Degraded with reason InvalidSpec", 60)
    assert obj["status"]["phase"] == "Degraded"
    message = condition_of(obj, "Degraded")["message"]
    assert message.startswith("spec.autoscaling.timeZone: 'Mars/Base' is not an IANA time zone")
    events = wait_for(lambda: events_of(core, ns, "mars", "InvalidSpec"), "an InvalidSpec Event")
    assert events[0].type == "Warning" and "Mars/Base" in events[0].message
    assert not pods_of(core, ns, "llmservice", "mars")
    # The timer (every 15 s) leaves a refused generation alone: no Event storm, no retries.
    time.sleep(20)
    assert len(events_of(core, ns, "mars", "InvalidSpec")) == 1

    patch = {"spec": {"autoscaling": {"timeZone": "Europe/Berlin"}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", "mars", patch)

    def recovered() -> Any:
        obj = get(custom, ns, "llmservices", "mars")
        ok = condition_of(obj, "Degraded").get("status") == "False"
        return obj if ok and (obj.get("status") or {}).get("readyReplicas") == 1 else None

    wait_for(recovered, "mars to recover once its time zone is fixed", 60)


def test_a_replica_the_scheduler_cannot_place_says_why_on_the_service(custom: Any, ns: str) -> None:
    """B. No node has 1,000 cores: after a short while the service says what the scheduler
    answers, instead of Progressing forever with Degraded=False."""
    create(custom, ns, service("huge", 1, 1, resources={"cpu": "1000", "memory": "1Gi"}))

    def reported() -> Any:
        obj = get(custom, ns, "llmservices", "huge")
        return obj if condition_of(obj, "Progressing").get("reason") == "Unschedulable" else None

    obj = wait_for(reported, "huge to report its replica unschedulable", 90, every_s=1)
    progressing = condition_of(obj, "Progressing")
    assert progressing["status"] == "False"
    assert progressing["message"].startswith("huge-0 (0/2 nodes are available")
    assert "cpu" in progressing["message"]
    degraded = condition_of(obj, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Unschedulable"
    assert obj["status"]["phase"] == "Degraded"

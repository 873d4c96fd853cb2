"""The worker's identity on the real control plane, and the harness that plays its kubelet.

A worker pod runs as ServiceAccount tidal-worker, whose RBAC lets it patch pods in its
namespace, and whose admission policy lets it change only its own pod (the one its token is
bound to), and there only the tidal.dev/checkpoint annotation. The pods here are built by the
operator's own pod builders (without an owner, which the garbage collector would miss).

The harness (e2e/pod_process.py) runs a pod's container as a local process, as a kubelet: here
with a stand-in for `tidal worker` that serves /health after a second, writes a checkpoint with
its pod-bound token when SIGTERM comes, and exits 143.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.helpers import wait_for
from e2e.pod_process import PodProcess
from tidal import api
from tidal.devcluster import LocalCluster
from tidal.devcluster.process import free_port
from tidal.kubeclient import api_client
from tidal.operator.desired import plan_job
from tidal.operator.kube import install
from tidal.operator.manifests import worker_identity
from tidal.operator.pods import job_pod, service_pod
from tidal.operator.spec import observe_pod, parse_job, parse_service

NOW = "2026-11-23T12:00:00Z"
CHECKPOINT = api.ANNOTATION_CHECKPOINT
# `tidal worker` as far as the harness can tell: args, env, /health, SIGTERM, exit codes.
STAND_IN = r"""
import http.server, json, os, signal, sys, time

def stop(signum, frame):
    print("SIGTERM", flush=True)
    if os.environ.get("STAND_IN_IGNORE_TERM"):
        return
    if checkpoint:
        note = {"metadata": {"annotations": {"tidal.dev/checkpoint": checkpoint}}}
        client.CoreV1Api().patch_namespaced_pod(
            os.environ["TIDAL_POD_NAME"], os.environ["TIDAL_POD_NAMESPACE"], note)
        print("CHECKPOINTED", flush=True)
    os._exit(143)

signal.signal(signal.SIGTERM, stop)
args = sys.argv[1:]
print("ARGS=" + json.dumps(args), flush=True)
print("POD=" + os.environ["TIDAL_POD_NAME"] + " NS=" + os.environ["TIDAL_POD_NAMESPACE"],
      flush=True)
print("LEAKED=" + json.dumps(sorted(k for k in os.environ if k.startswith("TIDAL_E2E"))),
      flush=True)
checkpoint = os.environ.get("STAND_IN_CHECKPOINT")
if checkpoint:
    from kubernetes import client, config
    config.load_kube_config(os.environ["KUBECONFIG"])
print("STARTED", flush=True)
if args[0] == "serve":
    port = int(next(a for a in args if a.startswith("--port=")).split("=")[1])
    time.sleep(1)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever(0.1)
else:
    deadline = time.monotonic() + float(os.environ.get("STAND_IN_EXIT_AFTER", "3600"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(int(os.environ.get("STAND_IN_EXIT_CODE", "0")))
"""
ENTRYPOINT = [sys.executable, "-c", STAND_IN]


@pytest.fixture(scope="module")
def installed(cluster: LocalCluster) -> None:
    """What `tidal operator install-crds` applies: the PriorityClasses the pods name, the
    workers' ClusterRole and their admission policy with its binding."""
    install(cluster.api_client())


@pytest.fixture
def ns(cluster: LocalCluster, namespace: str, installed: None) -> str:
    """A namespace with the workers' identity, as the operator makes it before its pods."""
    cluster.create_objects(worker_identity(namespace))
    return namespace


def _unowned(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    del pod["metadata"]["ownerReferences"]  # no such object: the garbage collector would delete
    return pod


def job_pods(ns: str, workers: int = 2) -> list[dict[str, Any]]:
    """Attempt 1 of each worker of an LLMBatchJob, as the operator makes them."""
    job = parse_job(job_object(ns, workers))
    return [_unowned(job_pod(job, index, 1, "")) for index in range(workers)]


def job_object(ns: str, workers: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND_LLMBATCHJOB,
        "metadata": {"name": "job", "namespace": ns, "uid": "job-uid", "generation": 1},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "parallelism": workers,
            "input": {"uri": "s3://in/"},
            "output": {"uri": "s3://out/"},
            "resources": {"cpu": "1", "memory": "1Gi"},
        },
    }


def replica_pod(ns: str, port: int) -> dict[str, Any]:
    obj = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND_LLMSERVICE,
        "metadata": {"name": "chat", "namespace": ns, "uid": "svc-uid", "generation": 1},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "port": port,
            "resources": {"cpu": "1", "memory": "1Gi"},
        },
    }
    return _unowned(service_pod(parse_service(obj), 0))


def create(core: Any, pod: dict[str, Any]) -> str:
    core.create_namespaced_pod(pod["metadata"]["namespace"], pod)
    name: str = pod["metadata"]["name"]
    return name


def as_worker(kubeconfig: Path) -> Any:
    return client.CoreV1Api(api_client(kubeconfig))


def note(key: str, value: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {key: value}}}


def refusal(action: Callable[[], Any]) -> str | None:
    """The API server's message when ``action`` is forbidden; None when it passed."""
    try:
        action()
    except ApiException as error:
        assert error.status == 403, error.body
        message: str = json.loads(error.body)["message"]
        return message
    return None


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    found: dict[str, Any] = next((c for c in conditions if c["type"] == kind), {})
    return found


def said(process: PodProcess, line: str) -> bool:
    """The stand-in printed ``line`` (the log's first line is the harness's, with the script)."""
    return line in process.log_text().splitlines()[1:]


def gone(core: Any, ns: str, name: str) -> bool:
    return all(p.metadata.name != name for p in core.list_namespaced_pod(ns).items)


# -- the identity -----------------------------------------------------------------------------
def test_a_worker_may_write_its_own_pods_checkpoint_and_nothing_else(
    cluster: LocalCluster, core: Any, ns: str, tmp_path: Path
) -> None:
    own, other = (create(core, pod) for pod in job_pods(ns))
    worker = as_worker(cluster.pod_kubeconfig(ns, own, tmp_path / "own.kubeconfig"))
    checkpoint = note(CHECKPOINT, "s3://out/ckpt/0/step-1")
    # The policy takes effect a moment after it is created.
    refused = wait_for(
        lambda: refusal(lambda: worker.patch_namespaced_pod(other, ns, checkpoint)),
        "the admission policy to refuse a patch of another pod",
    )
    assert f"a tidal worker may update only its own pod ({own}), not {other}" in refused

    worker.patch_namespaced_pod(own, ns, checkpoint)
    pod = core.read_namespaced_pod(own, ns)
    assert pod.metadata.annotations[CHECKPOINT] == "s3://out/ckpt/0/step-1"

    others = "a tidal worker may change no annotation of its pod but tidal.dev/checkpoint"
    image = {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}
    forbidden: list[tuple[dict[str, Any], str]] = [
        (note(api.ANNOTATION_ATTEMPT, "9"), others),
        (note("example.com/owner", "me"), others),
        ({"metadata": {"annotations": {CHECKPOINT: "s3://x", "example.com/x": "y"}}}, others),
        ({"metadata": {"labels": {api.LABEL_INDEX: "7"}}}, "may not change its pod's labels"),
        (image, "a tidal worker may not change its pod's spec"),
    ]
    for body, message in forbidden:
        found = refusal(functools.partial(worker.patch_namespaced_pod, own, ns, body))
        assert found is not None and message in found, (body, found)

    # The account's token, but not bound to a pod: refused, whichever pod it names.
    plain = cluster.service_account_kubeconfig(
        ns, api.WORKER_SERVICE_ACCOUNT, tmp_path / "plain.kubeconfig"
    )
    found = refusal(lambda: as_worker(plain).patch_namespaced_pod(own, ns, checkpoint))
    assert found is not None and "token must be bound to its pod" in found
    # RBAC: patch, nothing else (not even a read of its own pod).
    assert refusal(lambda: worker.read_namespaced_pod(own, ns)) is not None
    assert core.read_namespaced_pod(own, ns).metadata.annotations[CHECKPOINT].endswith("step-1")


# -- the harness ------------------------------------------------------------------------------
def test_pod_process_runs_a_replica_reports_ready_and_stops_it_when_deleted(
    core: Any, ns: str, tmp_path: Path
) -> None:
    port = free_port()
    name = create(core, replica_pod(ns, port))
    with PodProcess(core, name, ns, entrypoint=ENTRYPOINT, log_dir=tmp_path) as process:
        process.start()
        started = core.read_namespaced_pod(name, ns)
        assert started.status.phase == "Running"
        assert started.metadata.annotations["tidal.dev/kwok-external"] == "true"
        process.wait_ready(30)
        ready = core.read_namespaced_pod(name, ns)
        assert {c.type: c.status for c in ready.status.conditions}["Ready"] == "True"
        assert ready.status.container_statuses[0].state.running is not None
        assert said(process, f"ARGS={json.dumps(['serve', f'--port={port}'])}")
        assert said(process, f"POD={name} NS={ns}")  # fieldRef env, resolved
        assert said(process, "LEAKED=[]")  # the test's own TIDAL_* settings are not the pod's

        core.delete_namespaced_pod(name, ns)  # a scale-down: SIGTERM, 30 s grace
        assert process.wait_exit(30) == 143
    final = process.last_pod
    assert final["status"]["phase"] == "Failed"
    terminated = final["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 143
    assert condition(final, "Ready")["status"] == "False"
    wait_for(lambda: gone(core, ns, name), f"{name} to be deleted")


def test_an_evicted_worker_writes_its_checkpoint_in_its_grace_period_and_resumes_from_it(
    cluster: LocalCluster, core: Any, ns: str, tmp_path: Path
) -> None:
    name = create(core, job_pods(ns, 1)[0])
    kubeconfig = cluster.pod_kubeconfig(ns, name, tmp_path / "worker.kubeconfig")
    step = "s3://out/ckpt/0/step-3"
    with PodProcess(
        core, name, ns, entrypoint=ENTRYPOINT, kubeconfig=kubeconfig, log_dir=tmp_path,
        extra_env={"STAND_IN_CHECKPOINT": step, "CUDA_VISIBLE_DEVICES": ""},
    ) as process:  # fmt: skip
        process.start()
        process.wait_ready(10)  # no probe: ready once started
        running = process.last_pod
        wait_for(lambda: said(process, "STARTED"), "the stand-in to handle SIGTERM")
        eviction = {"metadata": {"name": name, "namespace": ns}}
        core.create_namespaced_pod_eviction(name, ns, eviction)
        assert process.wait_exit(60) == 143, process.tail()
    assert said(process, "CHECKPOINTED")
    final = process.last_pod
    assert condition(final, "DisruptionTarget")["status"] == "True"
    assert final["metadata"]["annotations"].get(CHECKPOINT) == step
    assert final["status"]["phase"] == "Failed"
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143
    wait_for(lambda: gone(core, ns, name), f"{name} to be deleted")

    # What the operator makes of it: a preemption (no backoff used up), resumed from there.
    job = parse_job(job_object(ns, 1))
    status = plan_job(job, [observe_pod(running)], {}, NOW).status
    plan = plan_job(job, [], status, NOW, gone=[observe_pod(final)])
    assert (plan.status["preemptions"], plan.status["failed"]) == (1, 0)
    (replacement,) = plan.create
    env = {e["name"]: e.get("value") for e in replacement["spec"]["containers"][0]["env"]}
    assert env["TIDAL_RESUME_FROM"] == step


@pytest.mark.parametrize(("code", "phase"), [(0, "Succeeded"), (3, "Failed")])
def test_a_worker_that_ends_is_reported_with_its_exit_code(
    core: Any, ns: str, tmp_path: Path, code: int, phase: str
) -> None:
    name = create(core, job_pods(ns, 1)[0])
    extra = {"STAND_IN_EXIT_AFTER": "0.5", "STAND_IN_EXIT_CODE": str(code)}
    with PodProcess(core, name, ns, entrypoint=ENTRYPOINT, extra_env=extra, log_dir=tmp_path) as p:
        p.start()
        assert p.wait_exit(30) == code
    pod = core.read_namespaced_pod(name, ns)
    assert pod.status.phase == phase
    assert pod.status.container_statuses[0].state.terminated.exit_code == code


def test_a_worker_that_ignores_sigterm_is_killed_after_its_grace_period(
    core: Any, ns: str, tmp_path: Path
) -> None:
    pod = job_pods(ns, 1)[0]
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    name = create(core, pod)
    extra = {"STAND_IN_IGNORE_TERM": "1"}
    with PodProcess(core, name, ns, entrypoint=ENTRYPOINT, extra_env=extra, log_dir=tmp_path) as p:
        p.start()
        p.wait_ready(10)
        wait_for(lambda: said(p, "STARTED"), "the stand-in to ignore SIGTERM")
        deleted = time.monotonic()
        core.delete_namespaced_pod(name, ns)
        assert p.wait_exit(30) == 137
        assert time.monotonic() - deleted >= 1.0
    assert said(p, "SIGTERM")
    wait_for(lambda: gone(core, ns, name), f"{name} to be deleted")

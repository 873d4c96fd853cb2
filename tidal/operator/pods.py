"""Worker pod manifests for LLMService replicas and LLMBatchJob workers (pure).

Every worker pod runs as ServiceAccount ``tidal-worker`` with its token mounted: a batch worker
annotates its own pod with each checkpoint (the extender weighs a victim's lost work by its
age), and the token the kubelet projects is bound to the pod, which is what the admission
policy of ``tidal.operator.manifests`` checks. A ``pvc://<claim>/<path>`` model is mounted
read-only at ``/models/<claim>``, where the worker looks for it. Services are probed on
``/health``: a startup probe gives the model time to load, then liveness and readiness take
over. Batch workers serve no HTTP, so they get no probe.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from tidal import api
from tidal.operator.spec import (
    LLMBatchJobSpec,
    LLMServiceSpec,
    WorkloadSpec,
)

# A replica drains its requests; a batch worker writes a checkpoint before it goes.
SERVICE_GRACE_S = 30
JOB_GRACE_S = 120
MODEL_VOLUME = "model"
# Loading (and sharding) a large checkpoint takes minutes: the startup probe allows 30 of them
# before the kubelet restarts the container; liveness and readiness start only after it passed
# (as vLLM's charts do), so a slow load is never mistaken for a hung server.
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 180
LIVENESS_PERIOD_S, LIVENESS_FAILURES = 10, 3  # 30 s without an answer: restart the server
READINESS_PERIOD_S, READINESS_FAILURES = 5, 3
PROBE_TIMEOUT_S = 5  # a server busy with a long prefill still answers /health in time


def service_pod_name(service: str, index: int) -> str:
    return f"{service}-{index}"


def job_pod_name(job: str, index: int, attempt: int) -> str:
    """A new name per attempt: a failed attempt's pod (and its logs) stays until the job goes."""
    return f"{job}-{index}-{attempt}"


def _env(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _field_env(name: str, path: str) -> dict[str, Any]:
    """The worker reports checkpoints by annotating its own pod, so it needs its name."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _model_volume(workload: WorkloadSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volume mounts) for the model: a pvc:// model's claim, read-only at
    /models/<claim>; nothing for other schemes (the worker reads those itself)."""
    claim = api.model_claim(workload.model_uri)
    if claim is None:
        return [], []
    name, _ = claim
    volume = {
        "name": MODEL_VOLUME,
        "persistentVolumeClaim": {"claimName": name, "readOnly": True},
    }
    mount = {"name": MODEL_VOLUME, "mountPath": f"{api.MODEL_PVC_ROOT}/{name}", "readOnly": True}
    return [volume], [mount]


def _model_env(workload: WorkloadSpec) -> dict[str, str]:
    """Where a pvc:// model is in the container: the root the worker resolves pvc:// under,
    and the model's own path (for logs and tools that take a plain path)."""
    claim = api.model_claim(workload.model_uri)
    if claim is None:
        return {}
    name, path = claim
    local = f"{api.MODEL_PVC_ROOT}/{name}" + (f"/{unquote(path)}" if path else "")
    return {api.ENV_PVC_ROOT: api.MODEL_PVC_ROOT, api.ENV_MODEL_PATH: local}


def _container(workload: WorkloadSpec, index: int) -> dict[str, Any]:
    _, mounts = _model_volume(workload)
    env = api.worker_env(
        model_name=workload.model_name,
        model_uri=workload.model_uri,
        dtype=workload.dtype,
        attention=workload.attention,
        tensor_parallel=workload.tensor_parallel,
        index=index,
    )
    container: dict[str, Any] = {
        "name": "worker",
        "image": workload.image,
        "resources": {
            "requests": {"cpu": workload.cpu, "memory": workload.memory},
            "limits": {api.GPU_RESOURCE: str(workload.tensor_parallel)},
        },
        "env": [
            *_env({**env, **_model_env(workload)}),
            _field_env(api.ENV_POD_NAME, "metadata.name"),
            _field_env(api.ENV_POD_NAMESPACE, "metadata.namespace"),
        ],
    }
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _base_pod(workload: WorkloadSpec, name: str, index: int, grace_s: int) -> dict[str, Any]:
    labels = {
        **workload.pod_labels,
        "app.kubernetes.io/name": "tidal-worker",
        "app.kubernetes.io/instance": workload.name,
        "app.kubernetes.io/managed-by": "tidal-operator",
        workload.owner_label: workload.name,
        api.LABEL_INDEX: str(index),
    }
    annotations = {
        **workload.pod_annotations,
        api.ANNOTATION_TOPOLOGY_MODE: workload.topology_mode,
        api.ANNOTATION_TOPOLOGY_TIER: workload.topology_tier,
        api.ANNOTATION_SPEC_HASH: workload.spec_hash(),
    }
    owner = {
        "apiVersion": api.API_VERSION,
        "kind": workload.kind,
        "name": workload.name,
        "uid": workload.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    volumes, _ = _model_volume(workload)
    spec: dict[str, Any] = {
        "schedulerName": api.SCHEDULER_NAME,
        "priorityClassName": workload.priority_class,
        "terminationGracePeriodSeconds": grace_s,
        "serviceAccountName": api.WORKER_SERVICE_ACCOUNT,
        # The worker's only API call, annotating its own pod, needs the pod-bound token.
        "automountServiceAccountToken": True,
        "containers": [_container(workload, index)],
    }
    if volumes:
        spec["volumes"] = volumes
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": workload.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "spec": spec,
    }


def _health_probe(period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": api.WORKER_HEALTH_PATH, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": PROBE_TIMEOUT_S,
        "failureThreshold": failures,
    }


def service_pod(service: LLMServiceSpec, index: int) -> dict[str, Any]:
    """Replica ``index``: one tensor-parallel group serving the OpenAI-compatible API."""
    workload = service.workload
    pod = _base_pod(workload, service_pod_name(workload.name, index), index, SERVICE_GRACE_S)
    container = pod["spec"]["containers"][0]
    container["args"] = api.serve_args(service.port, workload.args)
    container["ports"] = [{"name": "http", "containerPort": service.port}]
    container["startupProbe"] = _health_probe(STARTUP_PERIOD_S, STARTUP_FAILURES)
    container["livenessProbe"] = _health_probe(LIVENESS_PERIOD_S, LIVENESS_FAILURES)
    container["readinessProbe"] = _health_probe(READINESS_PERIOD_S, READINESS_FAILURES)
    pod["spec"]["restartPolicy"] = "Always"
    return pod


def job_pod(job: LLMBatchJobSpec, index: int, attempt: int, resume_from: str) -> dict[str, Any]:
    """Worker ``index`` of a batch job, attempt ``attempt``, resuming from ``resume_from``
    (the last checkpoint the previous attempt reported; empty to start from scratch)."""
    workload = job.workload
    name = job_pod_name(workload.name, index, attempt)
    pod = _base_pod(workload, name, index, JOB_GRACE_S)
    notes = pod["metadata"]["annotations"]
    notes[api.ANNOTATION_ATTEMPT] = str(attempt)
    # The extender weighs a victim's lost work by the time since its last checkpoint.
    notes[api.ANNOTATION_CHECKPOINT_INTERVAL] = str(job.checkpoint_interval_s)
    container = pod["spec"]["containers"][0]
    container["args"] = api.batch_args(workload.args)
    container["env"] += _env(
        api.batch_env(
            input_uri=job.input_uri,
            output_uri=job.output_uri,
            index=index,
            parallelism=job.parallelism,
            checkpoint_interval_s=job.checkpoint_interval_s,
            resume_from=resume_from,
            attempt=attempt,
        )
    )
    pod["spec"]["restartPolicy"] = "Never"  # the operator retries, counting failures
    return pod

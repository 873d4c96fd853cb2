"""Worker pod manifests for LLMService replicas and LLMBatchJob workers (pure)."""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal.operator.spec import (
    LLMBatchJobSpec,
    LLMServiceSpec,
    WorkloadSpec,
)

# A replica drains its requests; a batch worker writes a checkpoint before it goes.
SERVICE_GRACE_S = 30
JOB_GRACE_S = 120


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
    container = {
        "name": "worker",
        "image": workload.image,
        "resources": {
            "requests": {"cpu": workload.cpu, "memory": workload.memory},
            "limits": {api.GPU_RESOURCE: str(workload.tensor_parallel)},
        },
        "env": [
            *_env(
                {
                    "TIDAL_MODEL_NAME": workload.model_name,
                    "TIDAL_MODEL_URI": workload.model_uri,
                    "TIDAL_DTYPE": workload.dtype,
                    "TIDAL_ATTENTION": workload.attention,
                    "TIDAL_TENSOR_PARALLEL": str(workload.tensor_parallel),
                    "TIDAL_WORKER_INDEX": str(index),
                }
            ),
            _field_env("TIDAL_POD_NAME", "metadata.name"),
            _field_env("TIDAL_POD_NAMESPACE", "metadata.namespace"),
        ],
    }
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
        "spec": {
            "schedulerName": api.SCHEDULER_NAME,
            "priorityClassName": workload.priority_class,
            "terminationGracePeriodSeconds": grace_s,
            "containers": [container],
        },
    }


def service_pod(service: LLMServiceSpec, index: int) -> dict[str, Any]:
    """Replica ``index``: one tensor-parallel group serving the OpenAI-compatible API."""
    workload = service.workload
    pod = _base_pod(workload, service_pod_name(workload.name, index), index, SERVICE_GRACE_S)
    container = pod["spec"]["containers"][0]
    container["args"] = ["serve", f"--port={service.port}", *workload.args]
    container["ports"] = [{"name": "http", "containerPort": service.port}]
    container["readinessProbe"] = {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 5,
    }
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
    container["args"] = ["batch", *workload.args]
    container["env"] += _env(
        {
            "TIDAL_INPUT_URI": job.input_uri,
            "TIDAL_OUTPUT_URI": job.output_uri,
            "TIDAL_SHARD": f"{index}/{job.parallelism}",
            "TIDAL_CHECKPOINT_INTERVAL_SECONDS": str(job.checkpoint_interval_s),
            "TIDAL_RESUME_FROM": resume_from,
            "TIDAL_ATTEMPT": str(attempt),
        }
    )
    pod["spec"]["restartPolicy"] = "Never"  # the operator retries, counting failures
    return pod

"""The CustomResourceDefinitions of tidal (group ``tidal.dev``, version ``v1alpha1``), in one place.

Shared pieces (model, topology, resources) are written once and reused by ``LLMService`` and
``LLMBatchJob``. What an OpenAPI schema cannot say is written as CEL rules, each with a message
that names the field, so a bad object is rejected by the API server before the operator sees it.
``tidal operator manifests`` prints these; the e2e fixture and ``tidal operator install-crds``
apply them.
"""

from __future__ import annotations

from typing import Any

from tidal.rbac import app_labels, cluster_role, cluster_role_binding, service_account

GROUP = "tidal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "tidal"
TP_SIZES = [1, 2, 4, 8]
TOPOLOGY_MODES = ["guaranteed", "best-effort", "none"]
TOPOLOGY_TIERS = ["nvlink", "pcie-switch", "numa", "socket", "node", "rack"]
ONLINE_PRIORITY_CLASS = "tidal-online"
BATCH_PRIORITY_CLASS = "tidal-batch"
OPERATOR = "tidal-operator"  # its ServiceAccount, ClusterRole and binding
DEFAULT_IMAGE = "ghcr.io/tidal-llm/tidal-worker:0.1.0"
_URI_PATTERN = r"^(hf|s3|gs|az|pvc|file|https?)://.+"
_CLOCK_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


def _int(minimum: int | None = None, maximum: int | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _str(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def _obj(
    properties: dict[str, Any], required: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


def _immutable(schema: dict[str, Any]) -> dict[str, Any]:
    rule = {"rule": "self == oldSelf", "message": "is immutable; create a new object instead"}
    return {**schema, "x-kubernetes-validations": [rule]}


def _location(what: str) -> dict[str, Any]:
    uri = _str(pattern=_URI_PATTERN, description=f"Where the {what} is (hf://, s3://, pvc://…).")
    return _obj({"uri": uri}, ["uri"], description=f"The job's {what}.")


MODEL = _obj(
    {
        "name": _str(minLength=1, maxLength=253, description="Served model name (OpenAI API)."),
        "uri": _str(
            pattern=_URI_PATTERN,
            description="Weights in Hugging Face layout: hf://org/name, s3://…, pvc://claim/path.",
        ),
        "dtype": _str(enum=["bfloat16", "float16", "int8"], default="bfloat16"),
        "attention": _str(
            enum=["int8", "fp16"], default="int8", description="Attention kernel of the worker."
        ),
    },
    ["name", "uri"],
    description="The model the worker loads.",
)

TOPOLOGY = _obj(
    {
        "mode": _str(
            enum=TOPOLOGY_MODES,
            description="guaranteed: only aligned GPU sets; best-effort: prefer them; none.",
        ),
        "tier": _str(enum=TOPOLOGY_TIERS, default="nvlink", description="Alignment wanted."),
    },
    description="How the GPUs of one tensor-parallel group must sit together.",
)

RESOURCES = _obj(
    {
        "cpu": {"x-kubernetes-int-or-string": True, "default": "4"},
        "memory": {"x-kubernetes-int-or-string": True, "default": "32Gi"},
    },
    description="CPU and memory of each pod (GPUs come from tensorParallel).",
    default={},
)


_STRING_MAP = {"type": "object", "additionalProperties": _str()}


def _workload_properties(priority_class: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "tensorParallel": _int(
            enum=TP_SIZES, default=1, description="GPUs per replica / worker (1, 2, 4 or 8)."
        ),
        "priorityClassName": _str(default=priority_class, minLength=1),
        "resources": RESOURCES,
        "image": _str(default=DEFAULT_IMAGE, minLength=1),
        "args": {"type": "array", "items": _str(), "description": "Extra worker arguments."},
        "podMetadata": _obj(
            {"labels": _STRING_MAP, "annotations": _STRING_MAP},
            description="Labels and annotations added to every worker pod.",
        ),
    }


SCHEDULE_ENTRY = _obj(
    {
        "at": _str(
            pattern=_CLOCK_PATTERN, maxLength=5, description="Time of day HH:MM in timeZone."
        ),
        "replicas": _int(0, 1000),
    },
    ["at", "replicas"],
)

AUTOSCALING = _obj(
    {
        "minReplicas": _int(0, 1000, default=0),
        "maxReplicas": _int(1, 1000),
        "timeZone": _str(default="UTC", description="IANA time zone of the schedule."),
        "schedule": {
            "type": "array",
            "maxItems": 96,
            "items": SCHEDULE_ENTRY,
            "description": "Replica targets by time of day (the daily tide); each applies from "
            "its time until the next entry. `kubectl scale` holds until the next entry.",
            # Entries are keyed by time: the API server rejects two entries at one time.
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["at"],
        },
    },
    ["maxReplicas"],
    **{
        "x-kubernetes-validations": [
            {
                "rule": "self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
                "fieldPath": ".minReplicas",
            },
            {
                "rule": "!has(self.schedule) || self.schedule.all(e, "
                "e.replicas >= self.minReplicas && e.replicas <= self.maxReplicas)",
                "message": "schedule replicas must lie within [minReplicas, maxReplicas]",
                "fieldPath": ".schedule",
            },
        ]
    },
)

SERVICE_SPEC = _obj(
    {
        **_workload_properties(ONLINE_PRIORITY_CLASS),
        "replicas": _int(0, 1000, default=1),
        "autoscaling": AUTOSCALING,
        "topology": {**TOPOLOGY, "default": {"mode": "guaranteed", "tier": "nvlink"}},
        "port": _int(1, 65535, default=8000),
    },
    ["model"],
)

JOB_SPEC = _obj(
    {
        **_workload_properties(BATCH_PRIORITY_CLASS),
        "model": _immutable(MODEL),
        "tensorParallel": _immutable(_workload_properties("")["tensorParallel"]),
        "parallelism": _immutable(
            _int(1, 1024, default=1, description="Worker pods, each one tensor-parallel group.")
        ),
        "input": _immutable(_location("input")),
        "output": _immutable(_location("output")),
        "topology": {**TOPOLOGY, "default": {"mode": "best-effort", "tier": "nvlink"}},
        "checkpointIntervalSeconds": _int(30, 86400, default=600),
        "backoffLimit": _int(
            0,
            100,
            default=3,
            description="Failures before the job fails; preemptions do not count.",
        ),
        "maxPreemptions": _int(0, description="Fail the job after more preemptions than this."),
    },
    ["model", "input", "output"],
    **{
        "x-kubernetes-validations": [
            {
                "rule": "self.input.uri != self.output.uri",
                "message": "output.uri must differ from input.uri",
                "fieldPath": ".output.uri",
            }
        ]
    },
)

_CONDITION = _obj(
    {
        "type": _str(),
        "status": _str(enum=["True", "False", "Unknown"]),
        "reason": _str(),
        "message": _str(),
        "lastTransitionTime": _str(format="date-time"),
        "observedGeneration": _int(),
    },
    ["type", "status"],
)
_CONDITIONS = {
    "type": "array",
    "items": _CONDITION,
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
_PLACEMENT = _obj(
    {
        "index": _int(),
        "pod": _str(),
        "node": _str(),
        "gpus": _str(),
        "tier": _str(),
        "phase": _str(),
    }
)

SERVICE_STATUS = _obj(
    {
        "observedGeneration": _int(),
        "phase": _str(),
        "replicas": _int(),
        "readyReplicas": _int(),
        "updatedReplicas": _int(),
        "selector": _str(),
        "preemptions": _int(),
        "scheduleSlot": _str(description="The schedule entry last applied (date and time)."),
        "placements": {"type": "array", "items": _PLACEMENT},
        "conditions": _CONDITIONS,
    }
)

_WORKER = _obj(
    {
        **_PLACEMENT["properties"],
        "uid": _str(),
        "endedUID": _str(description="The attempt whose end is already counted."),
        "attempt": _int(),
        "state": _str(),
        "checkpoint": _str(),
        "preemptions": _int(),
        "failures": _int(),
    }
)

JOB_STATUS = _obj(
    {
        "observedGeneration": _int(),
        "phase": _str(),
        "active": _int(),
        "succeeded": _int(),
        "failed": _int(),
        "preemptions": _int(),
        "startTime": _str(format="date-time"),
        "completionTime": _str(format="date-time"),
        "workers": {"type": "array", "items": _WORKER},
        "conditions": _CONDITIONS,
    }
)

# GPUTopology.spec is the preset schema of tidal.topology (see tidal/topology/preset_data/),
# so a published object and a preset file are read by the same parser.
_GPU_IDS = {"type": "array", "items": _int(0)}
_SWITCH_PROPS = {"id": _int(0), "gpus": _GPU_IDS, "nics": {"type": "array", "items": _str()}}


def _switch(depth: int) -> dict[str, Any]:
    """PCIe switches cascade (a switch behind a switch); a schema cannot recurse, so the CRD
    spells out ``depth`` levels."""
    if depth == 1:
        return _obj(_SWITCH_PROPS)
    return _obj({**_SWITCH_PROPS, "switches": {"type": "array", "items": _switch(depth - 1)}})


_SWITCH = _switch(3)
_BRIDGE = _obj({"id": _int(0), "switches": {"type": "array", "items": _SWITCH}})
_NUMA = _obj(
    {"id": _int(0), "cpu_cores": _int(0), "host_bridges": {"type": "array", "items": _BRIDGE}}
)
_SOCKET = _obj({"id": _int(0), "numa_nodes": {"type": "array", "items": _NUMA}})
TOPOLOGY_SPEC = _obj(
    {
        "name": _str(description="Preset name when the node matches one."),
        "description": _str(),
        "gpu": _obj({"model": _str(), "memory_mib": _int(0)}, ["model"]),
        "sockets": {"type": "array", "items": _SOCKET, "minItems": 1},
        "nvlink": _obj(
            {
                "nvswitch": {"type": "boolean"},
                "lanes": _int(0),
                "links": {
                    "type": "array",
                    "items": {"type": "array", "items": _int(0), "minItems": 3, "maxItems": 3},
                    "description": "[gpu a, gpu b, NVLink lanes between them]",
                },
            }
        ),
        "rack_domain": _obj({"name": _str(), "nodes": _int(1)}, ["name", "nodes"]),
    },
    ["gpu", "sockets"],
)
_DEVICE = _obj(
    {
        "index": _int(0),
        "uuid": _str(),
        "pciBusId": _str(),
        "numaNode": _int(),
        "memoryMiB": _int(0),
        "healthy": {"type": "boolean"},
        "reason": _str(description="Why the GPU is unhealthy, e.g. an XID."),
    },
    ["index", "uuid"],
)
TOPOLOGY_STATUS = _obj(
    {
        "gpuCount": _int(0),
        "healthyGPUs": _str(description="GPU indices NVML reports healthy, e.g. 0,1,2,3."),
        "devices": {"type": "array", "items": _DEVICE},
        "driverVersion": _str(),
        "cudaVersion": _str(),
        "preset": _str(description="The bundled preset the discovered topology matches."),
        "topologyClass": _str(enum=["nvlink-rack", "nvswitch", "nvlink", "pcie"]),
        "source": _str(enum=["nvml", "fixture"]),
        "observedAt": _str(format="date-time", description="The node agent's last heartbeat."),
    }
)


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def _crd(
    kind: str,
    plural: str,
    short: str,
    scope: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "tidal"}},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _root(spec: dict[str, Any], status: dict[str, Any], description: str) -> dict[str, Any]:
    return _obj(
        {
            "apiVersion": _str(),
            "kind": _str(),
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        ["spec"],
        description=description,
    )


def custom_resource_definitions() -> list[dict[str, Any]]:
    """The three CRDs, ready to apply."""
    service = _crd(
        "LLMService",
        "llmservices",
        "llmsvc",
        "Namespaced",
        _root(SERVICE_SPEC, SERVICE_STATUS, "A long-running online LLM service."),
        [
            _column("Model", ".spec.model.name"),
            _column("TP", ".spec.tensorParallel", "integer"),
            _column("Desired", ".spec.replicas", "integer"),
            _column("Ready", ".status.readyReplicas", "integer"),
            _column("Phase", ".status.phase"),
            _AGE,
        ],
        {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )
    job = _crd(
        "LLMBatchJob",
        "llmbatchjobs",
        "llmjob",
        "Namespaced",
        _root(JOB_SPEC, JOB_STATUS, "Offline LLM work that may be preempted and resumes."),
        [
            _column("Model", ".spec.model.name"),
            _column("TP", ".spec.tensorParallel", "integer"),
            _column("Workers", ".spec.parallelism", "integer"),
            _column("Succeeded", ".status.succeeded", "integer"),
            _column("Preemptions", ".status.preemptions", "integer"),
            _column("Phase", ".status.phase"),
            _AGE,
        ],
        {"status": {}},
    )
    topology = _crd(
        "GPUTopology",
        "gputopologies",
        "gputopo",
        "Cluster",
        _root(TOPOLOGY_SPEC, TOPOLOGY_STATUS, "The GPU topology of one node, named after it."),
        [
            _column("GPUs", ".status.gpuCount", "integer"),
            _column("Model", ".spec.gpu.model"),
            _column("Preset", ".status.preset"),
            _column("Class", ".status.topologyClass"),
            _column("Healthy", ".status.healthyGPUs"),
            _column("Source", ".status.source", priority=1),
            _column("Heartbeat", ".status.observedAt", "date", priority=1),
            _AGE,
        ],
        {"status": {}},
    )
    return [service, job, topology]


def priority_classes() -> list[dict[str, Any]]:
    """Online services preempt; batch work never does (it waits for the tide to go out)."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": ONLINE_PRIORITY_CLASS},
            "value": 1_000_000,
            "preemptionPolicy": "PreemptLowerPriority",
            "description": "tidal online LLM services: may preempt batch work.",
        },
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": BATCH_PRIORITY_CLASS},
            "value": 1_000,
            "preemptionPolicy": "Never",
            "description": "tidal offline LLM batch jobs: preemptible, never preempt.",
        },
    ]


def operator_cluster_role() -> dict[str, Any]:
    """Least privilege for ``tidal operator run``."""
    tidal_resources = ["llmservices", "llmbatchjobs"]
    return cluster_role(
        OPERATOR,
        app_labels(OPERATOR, "operator"),
        [
            {
                "apiGroups": [GROUP],
                "resources": tidal_resources,
                "verbs": ["get", "list", "watch", "patch", "update"],
            },
            {
                "apiGroups": [GROUP],
                "resources": [f"{r}/status" for r in tidal_resources],
                "verbs": ["get", "patch", "update"],
            },
            {
                "apiGroups": [GROUP],
                "resources": ["gputopologies"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "verbs": ["get", "list", "watch", "create", "delete"],
            },
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["", "events.k8s.io"],
                "resources": ["events"],
                "verbs": ["create", "patch"],
            },
            # kopf peering (leader election between operator replicas) and CRD discovery.
            {
                "apiGroups": ["kopf.dev"],
                "resources": ["clusterkopfpeerings", "kopfpeerings"],
                "verbs": ["get", "list", "watch", "patch"],
            },
            {
                "apiGroups": ["apiextensions.k8s.io"],
                "resources": ["customresourcedefinitions"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["scheduling.k8s.io"],
                "resources": ["priorityclasses"],
                "verbs": ["get", "create"],
            },
        ],
    )


def kopf_peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering, where operator replicas see each other (``--peering``):
    the one with the highest priority works, the others wait."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def operator_identity(namespace: str) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and its binding to :func:`operator_cluster_role`."""
    labels = app_labels(OPERATOR, "operator")
    return [
        service_account(OPERATOR, namespace, labels),
        cluster_role_binding(OPERATOR, namespace, labels),
    ]


def manifests() -> list[dict[str, Any]]:
    """Everything the operator needs installed before it runs."""
    return [
        *custom_resource_definitions(),
        kopf_peering_crd(),
        *priority_classes(),
        operator_cluster_role(),
    ]

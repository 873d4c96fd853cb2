"""The CustomResourceDefinitions of tidal (group ``tidal.dev``, version ``v1alpha1``), in one place.

Shared pieces (model, topology, resources) are written once and reused by ``LLMService`` and
``LLMBatchJob``. What an OpenAPI schema cannot say is written as CEL rules, each with a message
that names the field, so a bad object is rejected by the API server before the operator sees it.
``tidal operator manifests`` prints these (with the rest of what the operator needs installed:
``manifests``); the e2e fixture and ``tidal operator install-crds`` apply them.
"""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal.placement import TopologyMode
from tidal.topology import Tier

CATEGORY = "tidal"
TP_SIZES = [1, 2, 4, 8]
TOPOLOGY_MODES = [mode.value for mode in TopologyMode]
# The operator creates one pod per replica / worker, never a gang, and the scheduler extender
# refuses 'rack' for a single pod ("'rack' applies to gangs only"): a workload asking for it
# would stay Pending forever, so the API server refuses it instead.
WORKLOAD_TIERS = [tier.label for tier in Tier if tier is not Tier.RACK]
# The PriorityClasses each kind may name without configuration. A service may run at batch
# priority (lower, harmless); a batch job may not run at online priority, which would let
# batch work preempt (tidal-online preempts lower priorities; tidal-batch never preempts).
SERVICE_PRIORITY_CLASSES = (api.PRIORITY_CLASS_ONLINE, api.PRIORITY_CLASS_BATCH)
JOB_PRIORITY_CLASSES = (api.PRIORITY_CLASS_BATCH,)
# metadata.name of an LLMService / LLMBatchJob becomes the value of the tidal.dev/llmservice
# (or llmbatchjob) and app.kubernetes.io/instance labels of its pods and of the selector the
# operator lists them by; a label value is at most 63 characters, so that is the bound. The pod
# names derived from it stay far inside a pod name's 253 (a DNS subdomain): a job's worker is
# "{job}-{index}-{attempt}", 63 + 1 + 4 (index < parallelism <= 1024) + 1 + digits of the
# attempt (one per failure or preemption; backoffLimit <= 100, maxPreemptions unbounded but
# an attempt would need 184 digits to overflow), and a replica is "{service}-{index}",
# 63 + 1 + 4 (index < 2 * 1000 replicas while old ones terminate).
MAX_NAME_LENGTH = 63
# Label and annotation keys the user may not set on worker pods: tidal.dev/ (and its
# subdomains) carries what the operator and the scheduler extender write and trust (owner
# labels, GPU sets, reservations, topology), and kubernetes.io/ and k8s.io/ are reserved by
# Kubernetes for its core components (kubernetes.io/hostname, …). Subdomains of those two
# (app.kubernetes.io/part-of, cluster-autoscaler.kubernetes.io/safe-to-evict) are meant for
# users and tools and stay allowed; the operator's own app.kubernetes.io/ labels win anyway.
RESERVED_KEY_PATTERN = r"^(([^/]*\.)?tidal\.dev|kubernetes\.io|k8s\.io)/"
# A qualified name, as Kubernetes checks label and annotation keys: an optional DNS-subdomain
# prefix and "/", then a name of alphanumerics, '-', '_' and '.' (lengths checked apart).
QUALIFIED_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A Kubernetes resource quantity (4, 500m, 1.5, 32Gi, 1e3), positive.
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
DEFAULT_IMAGE = "ghcr.io/tidal-llm/tidal-worker:0.1.0"
# A scheme, then no whitespace or control character anywhere (the URI is passed to the worker
# verbatim). file:// must be an absolute path outside the system directories of the worker's
# image, and without "." or ".." segments (the CEL rules of _uri).
_URI_PATTERN = r"^(hf|s3|gs|az|pvc|file|https?)://[^\s\x00-\x1f\x7f]+$"
SYSTEM_PATHS = ["bin", "boot", "dev", "etc", "lib", "lib64", "proc", "root", "run", "sbin", "sys"]
SYSTEM_PATHS += ["usr", "var"]
_FILE_SYSTEM_PATH = "^file:///+(" + "|".join(SYSTEM_PATHS) + ")(/|$)"
_DOT_SEGMENT = r"(^|/)\.\.?(/|$)"
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


def _cel(text: str) -> str:
    """``text`` as a CEL string literal (regular expressions carry backslashes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _uri(description: str) -> dict[str, Any]:
    path = "self.substring(self.indexOf('://') + 3)"
    rules = [
        {
            "rule": "!self.startsWith('file://') || self.startsWith('file:///')"
            f" && !self.matches({_cel(_FILE_SYSTEM_PATH)})",
            "message": "a file:// URI must be an absolute path (file:///data/…) outside the "
            "system directories /" + ", /".join(SYSTEM_PATHS),
        },
        {
            "rule": f"!{path}.matches({_cel(_DOT_SEGMENT)})",
            "message": "must not contain '.' or '..' path segments",
        },
    ]
    return _str(
        pattern=_URI_PATTERN,
        maxLength=2048,
        description=description,
        **{"x-kubernetes-validations": rules},
    )


def _location(what: str) -> dict[str, Any]:
    uri = _uri(f"Where the {what} is (hf://, s3://, pvc://…).")
    return _obj({"uri": uri}, ["uri"], description=f"The job's {what}.")


MODEL = _obj(
    {
        "name": _str(minLength=1, maxLength=253, description="Served model name (OpenAI API)."),
        "uri": _uri("Weights in Hugging Face layout: hf://org/name, s3://…, pvc://claim/path."),
        "dtype": _str(enum=["bfloat16", "float16", "float32", "int8"], default=api.DEFAULT_DTYPE),
        "attention": _str(
            enum=["int8", "fp16"],
            default=api.DEFAULT_ATTENTION,
            description="Attention kernel of the worker.",
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
        "tier": _str(
            enum=WORKLOAD_TIERS,
            default="nvlink",
            description=(
                "Alignment wanted: satisfied when every pair of the group's GPUs talks at "
                "this tier or better (the weakest link; 'rack' is for gangs, which no "
                "workload here is)."
            ),
        ),
    },
    description="How the GPUs of one tensor-parallel group must sit together.",
)


def _quantity(default: str, example: str) -> dict[str, Any]:
    """A positive resource quantity, as a number or a string: a bad one is refused here, not
    when the operator's pod create comes back 422."""
    return {
        "x-kubernetes-int-or-string": True,
        "default": default,
        "x-kubernetes-validations": [
            {
                "rule": "type(self) == int ? self > 0 : "
                "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                "message": f"must be a positive quantity such as {example}",
            }
        ],
    }


RESOURCES = _obj(
    {"cpu": _quantity("4", "500m or 4"), "memory": _quantity("32Gi", "512Mi or 32Gi")},
    description="CPU and memory of each pod (GPUs come from tensorParallel).",
    default={},
)

_RESERVED_KEYS = f"self.filter(k, k.matches({_cel(RESERVED_KEY_PATTERN)}))"
_KEY_RULES = [
    {
        "rule": f"self.all(k, k.matches({_cel(QUALIFIED_KEY_PATTERN)})"
        " && k.substring(k.lastIndexOf('/') + 1).size() <= 63 && k.lastIndexOf('/') <= 253)",
        "message": "keys must be qualified names: an optional DNS-subdomain prefix and '/', "
        "then at most 63 characters of alphanumerics, '-', '_' and '.'",
    },
    {
        "rule": f"{_RESERVED_KEYS}.size() == 0",
        "message": "the tidal.dev/, kubernetes.io/ and k8s.io/ prefixes are reserved",
        "messageExpression": f"'key ' + {_RESERVED_KEYS}[0] + ' is reserved: the tidal.dev/, "
        "kubernetes.io/ and k8s.io/ prefixes are set by tidal and Kubernetes, not podMetadata'",
    },
]
# Bounded so the API server can bound the cost of the CEL rules over the keys.
_MAX_KEYS = 64


def _string_map(values: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": values,
        "maxProperties": _MAX_KEYS,
        "x-kubernetes-validations": _KEY_RULES,
    }


POD_METADATA = _obj(
    {
        "labels": _string_map(_str(maxLength=63, pattern=LABEL_VALUE_PATTERN)),
        "annotations": _string_map(_str(maxLength=16384)),
    },
    description="Labels and annotations added to every worker pod (not in tidal.dev/, "
    "kubernetes.io/ or k8s.io/).",
)


def _workload_properties(priority_classes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "tensorParallel": _int(
            enum=TP_SIZES, default=1, description="GPUs per replica / worker (1, 2, 4 or 8)."
        ),
        # Free text would let a batch job run at system-node-critical: never preempted, and
        # preempting anything. The first entry is the kind's default.
        "priorityClassName": _str(
            default=priority_classes[0],
            enum=list(priority_classes),
            description="One of the PriorityClasses the operator is configured to allow.",
        ),
        "resources": RESOURCES,
        "image": _str(
            default=DEFAULT_IMAGE,
            minLength=1,
            maxLength=1024,
            pattern=r"^\S+$",
            description="The worker image (no whitespace).",
        ),
        "args": {"type": "array", "items": _str(), "description": "Extra worker arguments."},
        "podMetadata": POD_METADATA,
    }


def allowed_priority_classes(kind: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The PriorityClasses ``kind`` may name: its defaults (the kind's own first), then
    ``extra`` (the operator's configured list), without repeats."""
    base = SERVICE_PRIORITY_CLASSES if kind == api.KIND_LLMSERVICE else JOB_PRIORITY_CLASSES
    return tuple(dict.fromkeys((*base, *extra)))


def parse_priority_classes(text: str) -> tuple[str, ...]:
    """``TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES``: names separated by commas or spaces."""
    return tuple(n for n in text.replace(",", " ").split() if n)


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


def _dir(uri: str) -> str:
    """CEL: ``uri`` with one trailing slash, so s3://a/b and s3://a/b/ compare as one place."""
    return f"({uri}.endsWith('/') ? {uri} : {uri} + '/')"


_INPUT, _OUTPUT = _dir("self.input.uri"), _dir("self.output.uri")


def service_spec(priority_classes: tuple[str, ...] = SERVICE_PRIORITY_CLASSES) -> dict[str, Any]:
    return _obj(
        {
            **_workload_properties(priority_classes),
            "replicas": _int(0, 1000, default=1),
            "autoscaling": AUTOSCALING,
            "topology": {**TOPOLOGY, "default": {"mode": "guaranteed", "tier": "nvlink"}},
            "port": _int(1, 65535, default=8000),
        },
        ["model"],
    )


def job_spec(priority_classes: tuple[str, ...] = JOB_PRIORITY_CLASSES) -> dict[str, Any]:
    workload = _workload_properties(priority_classes)
    return _obj(
        {
            **workload,
            "model": _immutable(MODEL),
            "tensorParallel": _immutable(workload["tensorParallel"]),
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
                    # Workers would read what they write (or overwrite their input) when one
                    # location lies inside the other, or both are one place but for a slash.
                    "rule": f"!{_OUTPUT}.startsWith({_INPUT}) && !{_INPUT}.startsWith({_OUTPUT})",
                    "message": "output.uri must differ from input.uri: neither may lie inside "
                    "the other, nor differ from it only by a trailing slash",
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
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "tidal"},
        },
        "spec": {
            "group": api.GROUP,
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
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _root(
    spec: dict[str, Any], status: dict[str, Any], description: str, **extra: Any
) -> dict[str, Any]:
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
        **extra,
    )


# Without it a long name is accepted, its pods cannot be labelled (422), and its pods cannot
# even be listed by label for the finalizer (an invalid selector): see MAX_NAME_LENGTH.
_NAME_RULE = {
    "x-kubernetes-validations": [
        {
            "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            # The API server takes no fieldPath into metadata: the message names the field.
            "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
            "(it is the value of its pods' labels)",
        }
    ]
}


def custom_resource_definitions(
    extra_priority_classes: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The three CRDs, ready to apply; ``extra_priority_classes`` are the PriorityClasses
    the operator is configured to allow beyond tidal's own (``allowed_priority_classes``)."""
    return [
        _service_crd(allowed_priority_classes(api.KIND_LLMSERVICE, extra_priority_classes)),
        _job_crd(allowed_priority_classes(api.KIND_LLMBATCHJOB, extra_priority_classes)),
        _topology_crd(),
    ]


def _service_crd(priority_classes: tuple[str, ...]) -> dict[str, Any]:
    return _crd(
        api.KIND_LLMSERVICE,
        api.PLURAL_LLMSERVICES,
        "llmsvc",
        "Namespaced",
        _root(
            service_spec(priority_classes),
            SERVICE_STATUS,
            "A long-running online LLM service.",
            **_NAME_RULE,
        ),
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


def _job_crd(priority_classes: tuple[str, ...]) -> dict[str, Any]:
    return _crd(
        api.KIND_LLMBATCHJOB,
        api.PLURAL_LLMBATCHJOBS,
        "llmjob",
        "Namespaced",
        _root(
            job_spec(priority_classes),
            JOB_STATUS,
            "Offline LLM work that may be preempted and resumes.",
            **_NAME_RULE,
        ),
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


def _topology_crd() -> dict[str, Any]:
    return _crd(
        api.KIND_GPUTOPOLOGY,
        api.PLURAL_GPUTOPOLOGIES,
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

"""tidal's public contract: every name a user, a manifest or another component sees, with its
codec. Components import these; none spells them itself (as Koordinator's ``apis/extension``
holds its keys and their encoders together). Changing a value here is an API change.

What is here, and who writes or reads it:

- the API group and version of the CRDs, and their kinds and plurals;
- ``SCHEDULER_NAME``: the kube-scheduler profile that sends GPU pods to tidal's extender;
- ``GPU_RESOURCE``: the extended resource the node agent's device plugin serves (whole GPUs);
- pod annotations (``ANNOTATION_*``): the request (topology mode and tier, set by the operator
  or the user), what the extender writes at bind (GPU set, achieved tier), what workers write
  (checkpoints) and the operator's own bookkeeping;
- the pod condition ``CONDITION_RESERVATION``: a preemptor's plan, written by the extender on
  pods/status, where users cannot write;
- node and pod labels (``LABEL_*``);
- the ``tidal.dev/gpus`` codec (``"0,1,2,3"``);
- the worker's identity (``WORKER_SERVICE_ACCOUNT``) and how it is started: its subcommands,
  arguments and ``TIDAL_*`` environment (``ENV_*``, ``serve_args``, ``batch_args``,
  ``worker_env``, ``batch_env``), shared by the operator's pods and the node agent's standalone
  launcher, which must not import each other; where a ``pvc://`` model is mounted
  (``MODEL_PVC_ROOT``, ``model_claim``).

The values of the topology annotations are the core's enums: ``tidal.placement.TopologyMode``
(modes) and the labels of ``tidal.topology.Tier`` (tiers); the CRDs derive their enums from
those, so they cannot drift from what the scheduler accepts. This module imports nothing but the
standard library, so every component (and the CLI, at start) can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable

GROUP = "tidal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PREFIX = f"{GROUP}/"  # of every annotation, label and condition tidal owns

KIND_LLMSERVICE, PLURAL_LLMSERVICES = "LLMService", "llmservices"
KIND_LLMBATCHJOB, PLURAL_LLMBATCHJOBS = "LLMBatchJob", "llmbatchjobs"
KIND_GPUTOPOLOGY, PLURAL_GPUTOPOLOGIES = "GPUTopology", "gputopologies"
WORKLOAD_PLURALS = {KIND_LLMSERVICE: PLURAL_LLMSERVICES, KIND_LLMBATCHJOB: PLURAL_LLMBATCHJOBS}

SCHEDULER_NAME = "tidal-scheduler"
GPU_RESOURCE = "nvidia.com/gpu"

# -- pod annotations ------------------------------------------------------------------------
ANNOTATION_TOPOLOGY_MODE = PREFIX + "topology-mode"  # the request: a TOPOLOGY_MODES value
ANNOTATION_TOPOLOGY_TIER = PREFIX + "topology-tier"  # the request: a TOPOLOGY_TIERS value
ANNOTATION_GPUS = PREFIX + "gpus"  # the GPU set, written at bind (format_gpu_list)
ANNOTATION_TOPOLOGY_ACHIEVED = PREFIX + "topology-achieved"  # tightest tier of that set
ANNOTATION_CHECKPOINT_INTERVAL = PREFIX + "checkpoint-interval-seconds"  # lost-work model
ANNOTATION_CHECKPOINT = PREFIX + "checkpoint"  # the last checkpoint URI a batch worker wrote
ANNOTATION_ATTEMPT = PREFIX + "attempt"  # a batch worker's attempt number
ANNOTATION_SPEC_HASH = PREFIX + "spec-hash"  # the workload spec a pod was made from
# Written when a reservation ends without a bind: kube-scheduler requeues an unschedulable pod
# on a change to its metadata or spec, never on a status change.
ANNOTATION_RESERVATION_ENDED = PREFIX + "reservation-ended"

# -- pod conditions -------------------------------------------------------------------------
# A preemptor's plan: status True, the plan as JSON in the message; False when it ends.
CONDITION_RESERVATION = PREFIX + "reservation"

# -- labels ---------------------------------------------------------------------------------
LABEL_LLMSERVICE = PREFIX + "llmservice"  # on worker pods: the owning LLMService's name
LABEL_LLMBATCHJOB = PREFIX + "llmbatchjob"  # on worker pods: the owning LLMBatchJob's name
LABEL_INDEX = PREFIX + "index"  # on worker pods: replica or worker index
LABEL_TOPOLOGY_PRESET = PREFIX + "topology-preset"  # on nodes without an agent: a preset name
LABEL_GPU_MODEL = PREFIX + "gpu-model"  # on nodes, from the agent
LABEL_GPU_COUNT = PREFIX + "gpu-count"
LABEL_TOPOLOGY_CLASS = PREFIX + "topology-class"
LABEL_NVLINK_DOMAIN = PREFIX + "nvlink-domain"

# -- the worker's identity ----------------------------------------------------------------
# The ServiceAccount of every worker pod, in each workload namespace (and the ClusterRole bound
# to it there): a worker may patch its own pod, and only its tidal.dev/checkpoint annotation
# (a ValidatingAdmissionPolicy holds it to that; tidal.operator.manifests).
WORKER_SERVICE_ACCOUNT = "tidal-worker"

# -- PriorityClasses --------------------------------------------------------------------------
PRIORITY_CLASS_ONLINE = "tidal-online"
PRIORITY_CLASS_BATCH = "tidal-batch"


# -- the tidal.dev/gpus codec -----------------------------------------------------------------
def format_gpu_list(gpus: Iterable[int]) -> str:
    """GPU indices as the ``tidal.dev/gpus`` value: ascending, comma-separated ("0,1,2,3")."""
    return ",".join(str(i) for i in sorted(gpus))


def parse_gpu_list(text: str, gpu_count: int | None = None) -> tuple[int, ...]:
    """The ``tidal.dev/gpus`` value as distinct GPU indices, ascending; ValueError saying what
    is wrong otherwise (below ``gpu_count`` when it is given)."""
    try:
        indices = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"expected GPU indices like '0,1', got {text!r}") from error
    limit = gpu_count if gpu_count is not None else 1 << 16
    if any(i < 0 or i >= limit for i in indices) or len(set(indices)) != len(indices):
        upper = f"0..{gpu_count - 1}" if gpu_count is not None else "of the node"
        raise ValueError(f"{text!r} is not a set of distinct GPUs {upper}")
    return tuple(sorted(indices))


# -- how a worker is started: its command line and environment ---------------------------------
WORKER_SERVE, WORKER_BATCH = "serve", "batch"  # subcommands of `tidal worker`
DEFAULT_DTYPE = "bfloat16"  # of the model's weights when a spec names none
DEFAULT_ATTENTION = "int8"  # the worker's attention kernel when a spec names none
ENV_PREFIX = "TIDAL_"
ENV_MODEL_NAME = ENV_PREFIX + "MODEL_NAME"  # the served model name (OpenAI API)
ENV_MODEL_URI = ENV_PREFIX + "MODEL_URI"  # the weights, as the workload names them
ENV_MODEL_PATH = ENV_PREFIX + "MODEL_PATH"  # a pvc:// model's local path in the container
ENV_PVC_ROOT = ENV_PREFIX + "PVC_ROOT"  # where pvc://<claim> is mounted: <root>/<claim>
ENV_DTYPE = ENV_PREFIX + "DTYPE"
ENV_ATTENTION = ENV_PREFIX + "ATTENTION"
ENV_TENSOR_PARALLEL = ENV_PREFIX + "TENSOR_PARALLEL"
ENV_WORKER_INDEX = ENV_PREFIX + "WORKER_INDEX"  # replica or worker index
ENV_POD_NAME = ENV_PREFIX + "POD_NAME"  # a batch worker annotates its own pod
ENV_POD_NAMESPACE = ENV_PREFIX + "POD_NAMESPACE"
ENV_INPUT_URI = ENV_PREFIX + "INPUT_URI"
ENV_OUTPUT_URI = ENV_PREFIX + "OUTPUT_URI"
ENV_SHARD = ENV_PREFIX + "SHARD"  # "<index>/<count>": which part of the input is this worker's
ENV_CHECKPOINT_INTERVAL = ENV_PREFIX + "CHECKPOINT_INTERVAL_SECONDS"
ENV_RESUME_FROM = ENV_PREFIX + "RESUME_FROM"  # the checkpoint to resume from; empty: start
ENV_ATTEMPT = ENV_PREFIX + "ATTEMPT"
# Where a worker pod mounts the claim of a pvc://<claim>/<path> model (read-only), as
# <MODEL_PVC_ROOT>/<claim>: the worker resolves pvc:// URIs under $TIDAL_PVC_ROOT the same way.
MODEL_PVC_ROOT = "/models"
PVC_SCHEME = "pvc://"
WORKER_HEALTH_PATH = "/health"  # `tidal worker serve` answers 200 here once it can serve


def serve_args(port: int, extra: Iterable[str] = ()) -> list[str]:
    """`tidal worker serve`'s arguments: the OpenAI-compatible server on ``port``."""
    return [WORKER_SERVE, f"--port={port}", *extra]


def batch_args(extra: Iterable[str] = ()) -> list[str]:
    """`tidal worker batch`'s arguments (the rest comes from the environment)."""
    return [WORKER_BATCH, *extra]


def worker_env(
    *, model_name: str, model_uri: str, dtype: str, attention: str, tensor_parallel: int, index: int
) -> dict[str, str]:
    """The environment every worker gets: its model, kernels, parallelism and index."""
    return {
        ENV_MODEL_NAME: model_name,
        ENV_MODEL_URI: model_uri,
        ENV_DTYPE: dtype,
        ENV_ATTENTION: attention,
        ENV_TENSOR_PARALLEL: str(tensor_parallel),
        ENV_WORKER_INDEX: str(index),
    }


def batch_env(
    *,
    input_uri: str,
    output_uri: str,
    index: int,
    parallelism: int,
    checkpoint_interval_s: int,
    resume_from: str,
    attempt: int,
) -> dict[str, str]:
    """What a batch worker adds: its share of the input, where results and checkpoints go,
    and the checkpoint to resume from (empty: from the start)."""
    return {
        ENV_INPUT_URI: input_uri,
        ENV_OUTPUT_URI: output_uri,
        ENV_SHARD: f"{index}/{parallelism}",
        ENV_CHECKPOINT_INTERVAL: str(checkpoint_interval_s),
        ENV_RESUME_FROM: resume_from,
        ENV_ATTEMPT: str(attempt),
    }


def model_claim(uri: str) -> tuple[str, str] | None:
    """(claim, path inside it) of a ``pvc://claim/path`` model URI; None for other schemes.
    The path has no leading or trailing slash ("" for the claim's root)."""
    if not uri.lower().startswith(PVC_SCHEME):
        return None
    claim, _, path = uri[len(PVC_SCHEME) :].partition("/")
    return claim, path.strip("/")

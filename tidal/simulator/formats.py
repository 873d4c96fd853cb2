"""The trace formats the simulator reads, as data: which column holds each field, in which unit,
and which values of a class column mean online or batch work.

Every loader reads one small schema (the *fields* below, named as the "tidal trace" CSV names
its columns); a format is a mapping from those fields to a file's own columns, and a scenario
may change any of it (``columns``, ``units``, ``classes``, ``defaults``). docs/traces.md
describes each format and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["nodes", "jobs", "load"]
KINDS: tuple[Kind, ...] = ("nodes", "jobs", "load")

# Units a column may be in, per dimension, as a factor to the field's own unit (milli-CPUs,
# MiB, seconds).
UNITS: dict[str, dict[str, float]] = {
    "cpu": {"milli": 1.0, "cores": 1000.0},
    "memory": {
        "mib": 1.0,
        "gib": 1024.0,
        "tib": 1024.0**2,
        "kib": 1 / 1024,
        "bytes": 1 / 2**20,
        "mb": 1e6 / 2**20,
        "gb": 1e9 / 2**20,
    },
    "time": {"s": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0, "d": 86400.0},
}

CLASSES = ("online", "batch", "drop")  # what a value of the class column may map to


@dataclass(frozen=True, slots=True)
class Field:
    """One field of the schema: its dimension (``text``, ``count``, or a key of UNITS) and the
    value a row gets when the file has no column for it (None: the field is required)."""

    dimension: str
    default: float | str | None
    about: str


# Defaults for node CPU and memory are the synthetic clusters' (128 cores, about 1 TB): traces
# that leave them out do not constrain placement by them.
NODE_FIELDS: dict[str, Field] = {
    "name": Field("text", None, "node name (unique)"),
    "gpus": Field("count", None, "GPUs on the node"),
    "gpu_model": Field("text", "", "GPU model, the key of the model-to-preset table"),
    "cpu_milli": Field("cpu", 128_000.0, "allocatable CPU"),
    "memory_mib": Field("memory", 1_000_000.0, "allocatable memory"),
    "preset": Field("text", "", "topology preset, overriding the model table"),
}

JOB_FIELDS: dict[str, Field] = {
    "name": Field("text", "", "job name (for messages only)"),
    "class": Field("text", "batch", "online or batch, through the format's class table"),
    "gpus": Field("count", None, "GPUs per worker (per job with resources_per: job)"),
    "gpu_milli": Field("count", 1000.0, "thousandths of one GPU (< 1000: a GPU share)"),
    "workers": Field("count", 1.0, "pods that only run together (a gang when > 1)"),
    "cpu_milli": Field("cpu", 0.0, "CPU per worker"),
    "memory_mib": Field("memory", 0.0, "memory per worker"),
    "gpu_model": Field("text", "", "GPU models the job may run on, separated by |"),
    "submit_s": Field("time", "", "submission time (seconds or YYYY-MM-DD HH:MM:SS)"),
    "duration_s": Field("time", "", "run time; else end_s - start_s"),
    "start_s": Field("time", "", "start time, with end_s when there is no duration"),
    "end_s": Field("time", "", "end time"),
}

LOAD_FIELDS: dict[str, Field] = {
    "time_s": Field("time", None, "sample time; summed per hour of day"),
    "value": Field("count", None, "load (requests, QPS, ...) in any unit: only its shape counts"),
}

FIELDS: dict[Kind, dict[str, Field]] = {
    "nodes": NODE_FIELDS,
    "jobs": JOB_FIELDS,
    "load": LOAD_FIELDS,
}


@dataclass(frozen=True)
class TraceFormat:
    """How one public trace lays out the schema's fields."""

    name: str
    kind: Kind
    about: str
    columns: Mapping[str, str]  # field -> the file's column
    signature: tuple[str, ...]  # columns that tell this format from a header
    units: Mapping[str, str] = field(default_factory=dict)
    classes: Mapping[str, str] = field(default_factory=dict)  # class value -> online|batch|drop
    resources_per: Literal["worker", "job"] = "worker"


OPENB_NODES = TraceFormat(
    name="openb",
    kind="nodes",
    about="Alibaba openb 2023 (FGD, ATC'23) node list: sn,cpu_milli,memory_mib,gpu,model",
    columns={
        "name": "sn",
        "gpus": "gpu",
        "gpu_model": "model",
        "cpu_milli": "cpu_milli",
        "memory_mib": "memory_mib",
    },
    signature=("sn", "gpu", "model"),
)

ALIBABA_SPOT_NODES = TraceFormat(
    name="alibaba-spot",
    kind="nodes",
    about="Alibaba GPU spot trace 2026 node_info_df.csv: node_name,gpu_model,gpu_capacity_num,"
    "cpu_num (cores; no memory column)",
    columns={
        "name": "node_name",
        "gpus": "gpu_capacity_num",
        "gpu_model": "gpu_model",
        "cpu_milli": "cpu_num",
    },
    signature=("node_name", "gpu_capacity_num"),
    units={"cpu_milli": "cores"},
)

TIDAL_NODES = TraceFormat(
    name="tidal",
    kind="nodes",
    about="tidal node CSV: name,gpus[,gpu_model,cpu_milli,memory_mib,preset]",
    columns={name: name for name in NODE_FIELDS},
    signature=("name", "gpus"),
)

# openb's QoS classes: LS (latency-sensitive) and Guaranteed pods are online work; BE and
# Burstable are the preemptible batch work the bundled scenarios replay.
OPENB_JOBS = TraceFormat(
    name="openb",
    kind="jobs",
    about="Alibaba openb 2023 pod lists: name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,"
    "qos,pod_phase,creation_time,deletion_time,scheduled_time]",
    columns={
        "name": "name",
        "cpu_milli": "cpu_milli",
        "memory_mib": "memory_mib",
        "gpus": "num_gpu",
        "gpu_milli": "gpu_milli",
        "gpu_model": "gpu_spec",
        "class": "qos",
        "submit_s": "creation_time",
        "start_s": "creation_time",
        "end_s": "deletion_time",
    },
    signature=("name", "num_gpu", "gpu_milli"),
    classes={"LS": "online", "Guaranteed": "online", "BE": "batch", "Burstable": "batch"},
)

ALIBABA_SPOT_JOBS = TraceFormat(
    name="alibaba-spot",
    kind="jobs",
    about="Alibaba GPU spot trace 2026 job_info_df.csv: job_name,organization,gpu_model,"
    "cpu_request,gpu_request,worker_num,submit_time,duration,job_type (HP or Spot)",
    columns={
        "name": "job_name",
        "gpu_model": "gpu_model",
        "cpu_milli": "cpu_request",
        "gpus": "gpu_request",
        "workers": "worker_num",
        "submit_s": "submit_time",
        "duration_s": "duration",
        "class": "job_type",
    },
    signature=("job_name", "worker_num", "job_type"),
    units={"cpu_milli": "cores"},
    classes={"HP": "online", "Spot": "batch"},
)

# Helios (SenseTime, SC'21) cluster_log.csv counts GPUs and CPUs per job over node_num nodes,
# and has no priorities: every job is batch.
HELIOS_JOBS = TraceFormat(
    name="helios",
    kind="jobs",
    about="Helios (SC'21) cluster_log.csv: job_id,user,vc,gpu_num,cpu_num,node_num,state,"
    "submit_time,start_time,end_time,duration,queue (GPUs and CPUs per job)",
    columns={
        "name": "job_id",
        "gpus": "gpu_num",
        "cpu_milli": "cpu_num",
        "workers": "node_num",
        "submit_s": "submit_time",
        "duration_s": "duration",
    },
    signature=("job_id", "gpu_num", "node_num"),
    units={"cpu_milli": "cores"},
    resources_per="job",
)

TIDAL_JOBS = TraceFormat(
    name="tidal",
    kind="jobs",
    about="tidal job CSV: gpus,duration_s[,name,class,workers,gpu_model,cpu_milli,memory_mib,"
    "submit_s]",
    columns={name: name for name in JOB_FIELDS if name not in ("start_s", "end_s")},
    signature=("gpus", "duration_s"),
    classes={"online": "online", "batch": "batch", "drop": "drop"},
)

GENAI_QPS_LOAD = TraceFormat(
    name="genai-qps",
    kind="load",
    about="Alibaba GenAI gateway 2026 qps.csv: timestamp_anon,value,container_ip,request_type",
    columns={"time_s": "timestamp_anon", "value": "value"},
    signature=("timestamp_anon", "value"),
)

TIDAL_LOAD = TraceFormat(
    name="tidal",
    kind="load",
    about="tidal load CSV: time_s,value (any sampling; summed per hour of day)",
    columns={"time_s": "time_s", "value": "value"},
    signature=("time_s", "value"),
)

# In the order a header is matched against the signatures (most specific first).
FORMATS: dict[Kind, tuple[TraceFormat, ...]] = {
    "nodes": (OPENB_NODES, ALIBABA_SPOT_NODES, TIDAL_NODES),
    "jobs": (ALIBABA_SPOT_JOBS, OPENB_JOBS, HELIOS_JOBS, TIDAL_JOBS),
    "load": (GENAI_QPS_LOAD, TIDAL_LOAD),
}


def format_names(kind: Kind) -> list[str]:
    return [f.name for f in FORMATS[kind]]


def find_format(kind: Kind, name: str) -> TraceFormat:
    for candidate in FORMATS[kind]:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown {kind} format {name!r}; one of {', '.join(format_names(kind))}")


def guess_format(kind: Kind, header: list[str]) -> TraceFormat | None:
    """The first format whose signature columns are all in ``header``."""
    present = set(header)
    for candidate in FORMATS[kind]:
        if present.issuperset(candidate.signature):
            return candidate
    return None


def unit_factor(kind: Kind, name: str, unit: str) -> float:
    """The factor from ``unit`` to field ``name``'s own unit; ValueError names the choices."""
    dimension = FIELDS[kind][name].dimension
    choices = UNITS.get(dimension)
    if choices is None:
        raise ValueError(f"field {name!r} has no units")
    if unit not in choices:
        raise ValueError(f"unknown unit {unit!r} for {name!r}; one of {', '.join(choices)}")
    return choices[unit]

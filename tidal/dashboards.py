"""The Grafana dashboard "tidal: GPU pool" (``charts/tidal/dashboards/tidal-pool.json``), built as
plain dicts so it is reviewed as Python and cannot drift from the metrics it reads.

``make chart`` (``tidal.chartgen``) writes it; the chart ships it as a ConfigMap labelled for
Grafana's dashboard sidecar (``dashboards.enabled``). ``tests/test_dashboards.py`` checks that
every expression parses (``promtool check rules``), names only metrics tidal's registries (or
kube-scheduler) expose, that panel ids are unique and no two panels overlap.

Rows, top to bottom: Pool (stats), GPU grid (one cell per node and GPU, coloured by state, and
the allocations with their utilisation), Preemptions, Pending, Topology (the aligned share of
binds), Workloads (LLMServices, LLMBatchJobs, the workers' vLLM-style latencies), Health.

Every panel and query reads the data source variable ``${datasource}``. The expressions use
Grafana's variables (``$node``, ``$namespace``, ``$model_name``, ``$scheduler_job``,
``$__rate_interval``, ``$__range``); :data:`VARIABLE_SAMPLES` gives each a value for checking
them as plain PromQL.

Labels: the extender's ``tidal_gpu_allocation_info`` and the operator's series carry
``namespace`` (and ``pod``) of the workload, which Prometheus keeps only when the scrape honours
the target's labels (``honorLabels: true``); otherwise they arrive as ``exported_namespace``.
Gauges the extender exports are deduplicated with ``max`` (more than one replica may export the
same cache); counters are summed (only the leader decides).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tidal import api
from tidal.placement import TopologyMode
from tidal.scheduler_extender.pool import GpuState
from tidal.topology import Tier

TITLE = "tidal: GPU pool"
UID = "tidal-gpu-pool"
PATH = "dashboards/tidal-pool.json"  # relative to the chart's directory
SCHEMA_VERSION = 39  # Grafana 10.4 / 11
GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEDULER_PROFILE = api.SCHEDULER_NAME  # kube-scheduler's profile (schedulerName) for tidal

# The colour of each of tidal_gpu_state's states (the extender's GpuState: its value is the
# sample value, its label the text the grid shows and tidal_pool_gpus's state label).
STATE_COLOURS = {
    GpuState.FREE: "green",
    GpuState.BATCH: "blue",
    GpuState.ONLINE: "purple",
    GpuState.RESERVED: "yellow",
    GpuState.UNHEALTHY: "red",
}

# A value for each Grafana variable the expressions use, to check them as PromQL.
VARIABLE_SAMPLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$node": ".*",
    "$namespace": ".*",
    "$model_name": ".*",
    "$scheduler_job": api.SCHEDULER_NAME,
}

NODE = 'node=~"$node"'
NS = 'namespace=~"$namespace"'
MODEL = 'model_name=~"$model_name"'
RATE = "$__rate_interval"


# -- panels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """A panel's body (no id, no gridPos) and its size in grid units."""

    body: dict[str, Any]
    w: int
    h: int


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def target(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False
) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def targets(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    """Range queries (expr, legend), refIds A, B, ..."""
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def _panel(
    kind: str,
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    defaults: dict[str, Any],
    options: dict[str, Any],
    *,
    overrides: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
        "targets": queries,
        "title": title,
        "type": kind,
    }
    if transformations:
        body["transformations"] = transformations
    return body


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    *,
    unit: str = "short",
    stack: bool = False,
    bars: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
    w: int = 8,
    h: int = 8,
) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if stack or bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}, "custom": custom}
    defaults["unit"] = unit
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    options = {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return Panel(_panel("timeseries", title, description, queries, defaults, options), w, h)


def stat(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    *,
    unit: str = "short",
    thresholds: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    decimals: int | None = None,
    w: int = 3,
    h: int = 4,
) -> Panel:
    defaults: dict[str, Any] = {
        "color": {"mode": "thresholds"},
        "thresholds": thresholds or _thresholds((None, "text")),
        "unit": unit,
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "auto",
    }
    body = _panel("stat", title, description, queries, defaults, options, overrides=overrides)
    return Panel(body, w, h)


def table(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    *,
    defaults: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
    sort: str | None = None,
    w: int = 12,
    h: int = 10,
) -> Panel:
    options: dict[str, Any] = {
        "cellHeight": "sm",
        "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
        "showHeader": True,
    }
    if sort:
        options["sortBy"] = [{"desc": False, "displayName": sort}]
    fields = defaults or {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}}
    body = _panel(
        "table",
        title,
        description,
        queries,
        fields,
        options,
        overrides=overrides,
        transformations=transformations,
    )
    return Panel(body, w, h)


def _by_name(name: str, **properties: Any) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in sorted(properties.items())],
    }


def _organize(
    exclude: tuple[str, ...] = (), rename: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "id": "organize",
        "options": {
            "excludeByName": dict.fromkeys(exclude, True),
            "indexByName": {},
            "renameByName": rename or {},
        },
    }


def _quantiles(metric: str, by: str, selector: str, label: str) -> list[dict[str, Any]]:
    """p50 and p99 of a histogram, by ``by``."""
    return targets(
        *(
            (
                f"histogram_quantile({q}, sum by (le, {by}) "
                f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
                f"{{{{{label}}}}} p{round(q * 100)}",
            )
            for q in (0.5, 0.99)
        )
    )


# -- rows ------------------------------------------------------------------------------------


def _state_colours() -> list[dict[str, Any]]:
    return [
        _by_name(state.label, color={"fixedColor": STATE_COLOURS[state], "mode": "fixed"})
        for state in GpuState
    ]


def pool_row() -> Row:
    by_state = stat(
        "GPUs by state",
        "The extender's view of every GPU (tidal_pool_gpus): free, running batch work, "
        "running online work, reserved for a preemptor, unhealthy.",
        [target("max by (state) (tidal_pool_gpus)", "{{state}}", instant=True)],
        overrides=_state_colours(),
        w=8,
    )
    by_state.body["options"]["textMode"] = "value_and_name"
    intact = stat(
        "Intact capacity",
        "Share of the pool's aligned GPU domains still wholly free "
        "(tidal_pool_intact_capacity_ratio): low means fragmentation.",
        [target("max(tidal_pool_intact_capacity_ratio)", instant=True)],
        unit="percentunit",
        decimals=1,
        thresholds=_thresholds((None, "red"), (0.25, "orange"), (0.5, "green")),
        w=4,
    )
    return Row(
        "Pool",
        (
            stat(
                "GPUs",
                "GPUs the node agents report (tidal_gpu_info), on the selected nodes.",
                [target(f"count(tidal_gpu_info{{{NODE}}})", instant=True)],
            ),
            stat(
                "Healthy GPUs",
                "GPUs the device plugin reports healthy (tidal_gpu_healthy).",
                [target(f"sum(tidal_gpu_healthy{{{NODE}}})", instant=True)],
            ),
            by_state,
            intact,
            stat(
                "Preemptions (1h)",
                "Preemption plans the extender carried out in the last hour.",
                [target("sum(increase(tidal_extender_preemptions_total[1h]))", instant=True)],
                decimals=0,
            ),
            stat(
                "Victims (1h)",
                "Pods evicted as preemption victims in the last hour.",
                [target("sum(increase(tidal_extender_victims_total[1h]))", instant=True)],
                decimals=0,
            ),
        ),
    )


def grid_row() -> Row:
    mappings = [
        {
            "options": {
                str(state.value): {
                    "color": STATE_COLOURS[state],
                    "index": index,
                    "text": state.label,
                }
                for index, state in enumerate(GpuState)
            },
            "type": "value",
        }
    ]
    grid_fields = {
        "color": {"mode": "thresholds"},
        "custom": {
            "align": "center",
            "cellOptions": {"mode": "basic", "type": "color-background"},
            "inspect": False,
        },
        "mappings": mappings,
        "thresholds": _thresholds((None, "transparent")),
    }
    # the matrix's first column (node names) is the only string field: no colour there
    node_column = {
        "matcher": {"id": "byType", "options": "string"},
        "properties": [
            {"id": "custom.cellOptions", "value": {"type": "auto"}},
            {"id": "custom.align", "value": "left"},
        ],
    }
    grid = table(
        "GPU grid",
        "One row per node, one column per GPU index, coloured by the extender's state of the "
        "GPU (tidal_gpu_state: " + ", ".join(f"{s.value} {s.label}" for s in GpuState) + ").",
        [
            target(
                f"max by (node, gpu) (tidal_gpu_state{{{NODE}}})",
                instant=True,
                table=True,
            )
        ],
        defaults=grid_fields,
        overrides=[node_column],
        transformations=[
            {
                "id": "groupingToMatrix",
                "options": {
                    "columnField": "gpu",
                    "emptyValue": "empty",
                    "rowField": "node",
                    "valueField": "Value",
                },
            }
        ],
        w=12,
        h=12,
    )
    allocation = (
        "max by (node, gpu, namespace, pod, workload, class, tier) "
        f"(tidal_gpu_allocation_info{{{NODE}, {NS}}})"
    )
    allocations = table(
        "Allocations",
        "Which pod holds each GPU (tidal_gpu_allocation_info, from the extender's cache), "
        "joined on (node, gpu) with the node agent's utilisation and memory in use.",
        [
            target(
                f"{allocation} * on (node, gpu) group_left () "
                "max by (node, gpu) (tidal_gpu_utilization_ratio)",
                ref="A",
                instant=True,
                table=True,
            ),
            target(
                f"{allocation} * on (node, gpu) group_left () "
                "max by (node, gpu) (tidal_gpu_memory_used_bytes)",
                ref="B",
                instant=True,
                table=True,
            ),
        ],
        overrides=[
            _by_name(
                "utilisation",
                unit="percentunit",
                **{"custom.cellOptions": {"mode": "basic", "type": "gauge"}, "max": 1, "min": 0},
            ),
            _by_name("memory used", unit="bytes"),
        ],
        transformations=[
            {"id": "merge", "options": {}},
            _organize(("Time",), {"Value #A": "utilisation", "Value #B": "memory used"}),
        ],
        sort="node",
        w=12,
        h=12,
    )
    return Row("GPU grid", (grid, allocations))


def preemptions_row() -> Row:
    return Row(
        "Preemptions",
        (
            timeseries(
                "Preemptions by preemptor class and tier",
                "Preemption plans carried out per 5 minutes, by the preemptor's class and the "
                "tier it asked for.",
                targets(
                    (
                        "sum by (preemptor_class, tier) "
                        "(increase(tidal_extender_preemptions_total[5m]))",
                        "{{preemptor_class}} {{tier}}",
                    )
                ),
                bars=True,
                stack=True,
            ),
            timeseries(
                "Victim GPUs by class",
                "GPUs taken from victims per 5 minutes, by the victims' class.",
                targets(
                    (
                        "sum by (victim_class) "
                        "(increase(tidal_extender_preemption_victim_gpus_total[5m]))",
                        "{{victim_class}}",
                    )
                ),
                bars=True,
                stack=True,
            ),
            timeseries(
                "Preempt verb outcomes",
                "kube-scheduler's preempt calls to the extender per second, by outcome.",
                targets(
                    (
                        "sum by (outcome) "
                        f'(rate(tidal_extender_decisions_total{{verb="preempt"}}[{RATE}]))',
                        "{{outcome}}",
                    )
                ),
                unit="reqps",
            ),
            timeseries(
                "Wasted GPUs",
                "GPUs freed by preemptions that the preemptor did not use, per 5 minutes "
                "(should stay 0).",
                targets(
                    (
                        "sum(increase(tidal_extender_preemption_wasted_gpus_total[5m]))",
                        "wasted GPUs",
                    )
                ),
                bars=True,
            ),
            timeseries(
                "Lost GPU time",
                "Work lost by preempted victims (GPU-seconds since their last checkpoint), per "
                "5 minutes.",
                targets(
                    (
                        "sum(increase(tidal_extender_preemption_lost_gpu_seconds_total[5m]))",
                        "lost GPU-seconds",
                    )
                ),
                unit="s",
                bars=True,
            ),
            timeseries(
                "kube-scheduler preemption",
                "kube-scheduler's own preemption attempts per second and victims per attempt "
                "(p99), for the tidal-scheduler job.",
                targets(
                    (
                        "sum(rate(scheduler_preemption_attempts_total"
                        f'{{job="$scheduler_job"}}[{RATE}]))',
                        "attempts/s",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) (rate(scheduler_preemption_victims_"
                        f'bucket{{job="$scheduler_job"}}[{RATE}])))',
                        "victims p99",
                    ),
                ),
            ),
        ),
    )


def pending_row() -> Row:
    return Row(
        "Pending",
        (
            timeseries(
                "Pending GPU pods by reason",
                "GPU pods the extender knows are waiting, by why (tidal_extender_pending_pods).",
                targets(("max by (reason) (tidal_extender_pending_pods)", "{{reason}}")),
                stack=True,
            ),
            timeseries(
                "kube-scheduler queues",
                "Pods in kube-scheduler's queues (active, backoff, unschedulable, gated).",
                targets(
                    (
                        'sum by (queue) (scheduler_pending_pods{job="$scheduler_job"})',
                        "{{queue}}",
                    )
                ),
                stack=True,
            ),
            timeseries(
                "Preemptor wait",
                "Time from a preemption to the preemptor's bind (p50, p99).",
                targets(
                    *(
                        (
                            f"histogram_quantile({q}, sum by (le) "
                            f"(rate(tidal_extender_preemptor_wait_seconds_bucket[{RATE}])))",
                            f"p{round(q * 100)}",
                        )
                        for q in (0.5, 0.99)
                    )
                ),
                unit="s",
            ),
            timeseries(
                "Filter outcomes",
                "The extender's filter answers per second, by outcome (fits, preempt-verb, "
                "no-plan, waiting, reserved, ...).",
                targets(
                    (
                        "sum by (outcome) "
                        f'(rate(tidal_extender_decisions_total{{verb="filter"}}[{RATE}]))',
                        "{{outcome}}",
                    )
                ),
                unit="reqps",
                w=12,
            ),
            timeseries(
                "Schedule attempts by result",
                "kube-scheduler's scheduling attempts per second for the tidal-scheduler "
                "profile, by result.",
                targets(
                    (
                        "sum by (result) (rate(scheduler_schedule_attempts_total"
                        f'{{profile="{SCHEDULER_PROFILE}"}}[{RATE}]))',
                        "{{result}}",
                    )
                ),
                unit="ops",
                w=12,
            ),
        ),
    )


def _binds(function: str, window: str, aligned: bool) -> str:
    """``function`` (rate or increase) of binds that asked for a tier (mode guaranteed or
    best-effort), by mode; with ``aligned``, only those placed at that tier or a stronger one."""
    metric = "tidal_extender_binds_total"
    mode = f'mode!="{TopologyMode.NONE.value}"'
    if not aligned:
        return f"sum by (mode) ({function}({metric}{{{mode}}}[{window}]))"
    parts = []
    for requested in Tier:
        ok = "|".join(t.label for t in Tier if t <= requested)
        selector = f'{mode}, requested_tier="{requested.label}", achieved_tier=~"{ok}"'
        parts.append(f"{function}({metric}{{{selector}}}[{window}])")
    return "sum by (mode) (" + " or ".join(parts) + ")"


def aligned_share(function: str, window: str) -> str:
    """Binds placed at their requested tier (or a stronger one) over all binds that asked for
    one, by mode; 0 rather than nothing when none was aligned."""
    total = _binds(function, window, aligned=False)
    return f"({_binds(function, window, aligned=True)} or 0 * {total}) / {total}"


def topology_row() -> Row:
    share = stat(
        "Aligned share (range)",
        "Binds placed at the tier they asked for or a stronger one, over the dashboard's "
        "range, by topology mode (guaranteed is aligned by construction).",
        [target(aligned_share("increase", "$__range"), "{{mode}}", instant=True)],
        unit="percentunit",
        decimals=1,
        thresholds=_thresholds((None, "red"), (0.8, "orange"), (0.95, "green")),
        w=6,
        h=8,
    )
    share.body["options"]["textMode"] = "value_and_name"
    return Row(
        "Topology",
        (
            share,
            timeseries(
                "Aligned share (1h window)",
                "The aligned share of binds over a sliding hour, by topology mode.",
                targets((aligned_share("increase", "1h"), "{{mode}}")),
                unit="percentunit",
                maximum=1,
                w=6,
            ),
            table(
                "Binds: requested vs achieved tier",
                "Binds over the dashboard's range by mode, the tier asked for and the tier "
                "the GPUs share.",
                [
                    target(
                        "sum by (mode, requested_tier, achieved_tier) "
                        "(increase(tidal_extender_binds_total[$__range]))",
                        instant=True,
                        table=True,
                    )
                ],
                overrides=[_by_name("binds", decimals=0)],
                transformations=[_organize(("Time",), {"Value": "binds"})],
                sort="mode",
                w=6,
                h=8,
            ),
            timeseries(
                "Bind outcomes",
                "The extender's bind answers per second, by outcome (bound, conflict, "
                "api-error, unknown-pod).",
                targets(
                    (
                        "sum by (outcome) "
                        f'(rate(tidal_extender_decisions_total{{verb="bind"}}[{RATE}]))',
                        "{{outcome}}",
                    )
                ),
                unit="reqps",
                w=6,
            ),
        ),
    )


def workloads_row() -> Row:
    """LLMServices and LLMBatchJobs (the operator's series), then the workers' (by model)."""
    operator = (
        timeseries(
            "LLMServices: served ratio",
            "The share of each LLMService's demand its ready replicas serve "
            "(tidal_llmservice_served_ratio; 1: all of it).",
            targets(
                (
                    f"min by (namespace, name) (tidal_llmservice_served_ratio{{{NS}}})",
                    "{{namespace}}/{{name}}",
                )
            ),
            unit="percentunit",
            maximum=1,
            w=6,
        ),
        timeseries(
            "LLMServices: replicas",
            "Desired and ready replicas of each LLMService.",
            targets(
                (
                    f"max by (namespace, name, state) (tidal_llmservice_replicas{{{NS}}})",
                    "{{namespace}}/{{name}} {{state}}",
                )
            ),
            w=6,
        ),
        timeseries(
            "LLMBatchJobs: workers by phase",
            "Batch workers of the selected namespaces, by phase.",
            targets((f"sum by (phase) (tidal_llmbatchjob_workers{{{NS}}})", "{{phase}}")),
            stack=True,
            w=6,
        ),
        timeseries(
            "LLMBatchJobs: goodput",
            "GPU-seconds of batch work kept per second, i.e. GPUs doing useful batch work, by job.",
            targets(
                (
                    "sum by (namespace, name) "
                    f"(rate(tidal_batch_goodput_gpu_seconds_total{{{NS}}}[{RATE}]))",
                    "{{namespace}}/{{name}}",
                )
            ),
            stack=True,
            w=6,
        ),
        timeseries(
            "LLMBatchJobs: preemptions",
            "Times each batch job has been preempted.",
            targets(
                (
                    f"max by (namespace, name) (tidal_llmbatchjob_preemptions{{{NS}}})",
                    "{{namespace}}/{{name}}",
                )
            ),
            w=6,
        ),
    )
    workers = (
        timeseries(
            "Tokens per second",
            "Generated and prompt tokens per second, by model.",
            targets(
                (
                    f"sum by (model_name) (rate(tidal_generation_tokens_total{{{MODEL}}}[{RATE}]))",
                    "{{model_name}} generated",
                ),
                (
                    f"sum by (model_name) (rate(tidal_prompt_tokens_total{{{MODEL}}}[{RATE}]))",
                    "{{model_name}} prompt",
                ),
            ),
            w=6,
        ),
        timeseries(
            "Requests running and waiting",
            "Requests in the workers' running batches and waiting to be scheduled, by model.",
            targets(
                (
                    f"sum by (model_name) (tidal_num_requests_running{{{MODEL}}})",
                    "{{model_name}} running",
                ),
                (
                    f"sum by (model_name) (tidal_num_requests_waiting{{{MODEL}}})",
                    "{{model_name}} waiting",
                ),
            ),
            w=6,
        ),
        timeseries(
            "KV cache usage",
            "The fullest worker's KV cache, by model.",
            targets(
                (
                    f"max by (model_name) (tidal_kv_cache_usage_perc{{{MODEL}}})",
                    "{{model_name}}",
                )
            ),
            unit="percentunit",
            maximum=1,
            w=6,
        ),
        timeseries(
            "Time to first token",
            "The workers' time to first token (p50, p99), by model.",
            _quantiles("tidal_time_to_first_token_seconds", "model_name", MODEL, "model_name"),
            unit="s",
        ),
        timeseries(
            "Inter-token latency",
            "Time between output tokens (p50, p99), by model.",
            _quantiles("tidal_inter_token_latency_seconds", "model_name", MODEL, "model_name"),
            unit="s",
        ),
        timeseries(
            "Request latency",
            "Arrival to finish (p50, p99), by model.",
            _quantiles("tidal_e2e_request_latency_seconds", "model_name", MODEL, "model_name"),
            unit="s",
        ),
        timeseries(
            "Prefix cache hit ratio",
            "Share of prompt tokens found in the prefix cache, by model.",
            targets(
                (
                    f"sum by (model_name) (rate(tidal_prefix_cache_hits_total{{{MODEL}}}[{RATE}]))"
                    " / sum by (model_name) "
                    f"(rate(tidal_prefix_cache_queries_total{{{MODEL}}}[{RATE}]))",
                    "{{model_name}}",
                )
            ),
            unit="percentunit",
            maximum=1,
            w=12,
        ),
        timeseries(
            "Recomputed sequences",
            "Sequences the workers preempted to recompute later (KV cache full), per second, "
            "by model.",
            targets(
                (
                    f"sum by (model_name) (rate(tidal_num_preemptions_total{{{MODEL}}}[{RATE}]))",
                    "{{model_name}}",
                )
            ),
            unit="ops",
            w=12,
        ),
    )
    return Row("Workloads", operator + workers)


def health_row() -> Row:
    return Row(
        "Health",
        (
            timeseries(
                "Extender latency p99",
                "p99 time to answer each extender verb (kube-scheduler gives up after "
                "scheduler.extender.timeout).",
                targets(
                    (
                        "histogram_quantile(0.99, sum by (le, verb) "
                        f"(rate(tidal_extender_verb_duration_seconds_bucket[{RATE}])))",
                        "{{verb}}",
                    )
                ),
                unit="s",
            ),
            timeseries(
                "Extender cache objects",
                "Objects in the extender's cluster cache, by kind.",
                targets(("max by (kind) (tidal_extender_cache_objects)", "{{kind}}")),
            ),
            timeseries(
                "Extender problems",
                "Malformed requests answered 400 (by verb), cache changes that raised (by "
                "kind; a bug if not 0) and unreadable object fields per second.",
                targets(
                    (
                        f"sum by (verb) (rate(tidal_extender_bad_requests_total[{RATE}]))",
                        "bad requests {{verb}}",
                    ),
                    (
                        "max by (kind) (tidal_extender_cache_apply_failures)",
                        "apply failures {{kind}}",
                    ),
                    (
                        f"sum by (kind) (rate(tidal_extender_object_problems_total[{RATE}]))",
                        "unreadable {{kind}}",
                    ),
                ),
            ),
            timeseries(
                "Topology heartbeat age",
                "Seconds since each node agent last wrote its GPUTopology status.",
                targets(
                    (
                        "time() - max by (node) "
                        f"(tidal_gpu_topology_heartbeat_timestamp_seconds{{{NODE}}})",
                        "{{node}}",
                    )
                ),
                unit="s",
                w=6,
            ),
            timeseries(
                "Device plugin allocations",
                "The node agents' Allocate calls per second, by outcome (tidal: the pod's "
                "annotated GPUs; untracked: a pod scheduled without tidal; refused: a mismatch).",
                targets(
                    (
                        f"sum by (outcome) (rate(tidal_gpu_allocations_total{{{NODE}}}[{RATE}]))",
                        "{{outcome}}",
                    )
                ),
                unit="ops",
                w=6,
            ),
            timeseries(
                "GPU temperature",
                "The hottest GPU of each node.",
                targets((f"max by (node) (tidal_gpu_temperature_celsius{{{NODE}}})", "{{node}}")),
                unit="celsius",
                minimum=None,
                w=6,
            ),
            timeseries(
                "GPU power",
                "Power drawn by each node's GPUs.",
                targets((f"sum by (node) (tidal_gpu_power_watts{{{NODE}}})", "{{node}}")),
                unit="watt",
                w=6,
            ),
            stat(
                "Unhealthy GPUs",
                "GPUs the device plugin reports unhealthy; tidal places nothing new on them.",
                [
                    target(
                        f"count(tidal_gpu_healthy{{{NODE}}} == 0) or vector(0)",
                        instant=True,
                    )
                ],
                thresholds=_thresholds((None, "green"), (1, "red")),
                w=4,
                h=8,
            ),
            table(
                "Unhealthy GPUs by node",
                "Each unhealthy GPU with its identity (tidal_gpu_info).",
                [
                    target(
                        "max by (node, gpu, uuid, model, pci_bus_id) "
                        f"(tidal_gpu_info{{{NODE}}}) * on (node, gpu) group_left () "
                        f"(max by (node, gpu) (tidal_gpu_healthy{{{NODE}}}) == 0)",
                        instant=True,
                        table=True,
                    )
                ],
                transformations=[_organize(("Time", "Value"))],
                sort="node",
                w=20,
                h=8,
            ),
        ),
    )


def rows() -> list[Row]:
    return [
        pool_row(),
        grid_row(),
        preemptions_row(),
        pending_row(),
        topology_row(),
        workloads_row(),
        health_row(),
    ]


# -- variables and the dashboard -------------------------------------------------------------


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {
            "qryType": 1,
            "query": query,
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "refresh": 2,  # on time range change
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def variables() -> list[dict[str, Any]]:
    job = SCHEDULER_PROFILE
    return [
        {
            "current": {},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
            "type": "datasource",
        },
        _query_variable("node", "Node", "label_values(tidal_gpu_info, node)"),
        _query_variable(
            "namespace", "Namespace", "label_values(tidal_gpu_allocation_info, namespace)"
        ),
        _query_variable(
            "model_name", "Model", "label_values(tidal_num_requests_running, model_name)"
        ),
        {
            "current": {"selected": False, "text": job, "value": job},
            "description": "The Prometheus job of tidal's kube-scheduler (scheduler_* metrics); "
            "the chart's ServiceMonitor names it after the Service.",
            "hide": 0,
            "label": "kube-scheduler job",
            "name": "scheduler_job",
            "options": [{"selected": True, "text": job, "value": job}],
            "query": job,
            "skipUrlSync": False,
            "type": "textbox",
        },
    ]


def layout(all_rows: list[Row]) -> list[dict[str, Any]]:
    """Grafana's flat panel list: each row panel, then its panels left to right, wrapping at
    the grid's width; ids 1, 2, ... in that order."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in all_rows:
        panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "id": len(panels) + 1,
                "panels": [],
                "title": row.title,
                "type": "row",
            }
        )
        y += 1
        x, line = 0, 0
        for panel in row.panels:
            if panel.w > GRID_WIDTH:
                raise ValueError(f"{panel.body['title']}: wider than the grid")
            if x + panel.w > GRID_WIDTH:
                y, x, line = y + line, 0, 0
            body = {**panel.body, "id": len(panels) + 1}
            body["gridPos"] = {"h": panel.h, "w": panel.w, "x": x, "y": y}
            panels.append(body)
            x, line = x + panel.w, max(line, panel.h)
        y += line
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "tidal's GPU pool: GPU states per node, preemptions, pending pods, "
        "topology alignment, workloads and component health. Generated by tidal.dashboards "
        "(`make chart`); edit the Python, not this file.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": layout(rows()),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["tidal", "gpu", "kubernetes"],
        "templating": {"list": variables()},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def dashboard_json() -> str:
    """The dashboard file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def files() -> dict[str, str]:
    """The chart's dashboard files: path (relative to the chart) → text."""
    return {PATH: dashboard_json()}


def panels_of(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and panels nested in collapsed rows included."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel query (the variables' label_values queries are no PromQL)."""
    out = []
    for panel in panels_of(board):
        for t in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {t['refId']}", t["expr"]))
    return out


def as_promql(expr: str) -> str:
    """``expr`` with each Grafana variable replaced by its :data:`VARIABLE_SAMPLES` value
    (longest names first, so ``$__range`` is not read as part of another)."""
    for name in sorted(VARIABLE_SAMPLES, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", VARIABLE_SAMPLES[name])
        expr = expr.replace(name, VARIABLE_SAMPLES[name])
    return expr


__all__ = [
    "DATASOURCE",
    "PATH",
    "STATE_COLOURS",
    "TITLE",
    "UID",
    "VARIABLE_SAMPLES",
    "Panel",
    "Row",
    "aligned_share",
    "as_promql",
    "dashboard",
    "dashboard_json",
    "expressions",
    "files",
    "layout",
    "panels_of",
    "rows",
    "variables",
]

"""The Grafana dashboard "tidal: GPU pool" (tidal.dashboards, charts/tidal/dashboards/): the
committed JSON is what the Python generates, its layout is sound (unique ids, no overlapping
panels), every panel reads the data source variable, every expression parses (`promtool check
rules`) and names only metrics tidal's registries or kube-scheduler expose, and the chart ships
it as a ConfigMap for Grafana's sidecar.

promtool comes from Debian's prometheus package, which e2e/build.sh (`make e2e-binaries`)
unpacks into ~/.cache/tidal/prometheus; helm from the dev cluster's binary cache. Without them
the tests that need them skip, unless TIDAL_E2E=require (CI), which makes that a failure.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tidal import dashboards
from tidal.chartgen import generated_files
from tidal.devcluster.binaries import K8S_VERSION, default_binaries
from tidal.inference_worker.metrics import WorkerMetrics
from tidal.node_agent.metrics import AgentMetrics
from tidal.scheduler_extender.metrics import ExtenderMetrics
from tidal.scheduler_extender.pool import GpuState

CHART = Path(__file__).resolve().parents[1] / "charts" / "tidal"
NAMESPACE = "tidal-system"
BOARD = dashboards.dashboard()
PANELS = [p for p in dashboards.panels_of(BOARD) if p["type"] != "row"]
ROWS = [p for p in BOARD["panels"] if p["type"] == "row"]

# kube-scheduler's own metrics (not tidal's registries), by prefix.
ALLOWED_PREFIXES = ("scheduler_",)

# EXPECTED OPERATOR METRICS: what tidal.operator.metrics is to export (exposition names). Used
# only while that module does not exist; once it does, its registry is the source and this
# list must be a subset of it (see test_the_operator_list_matches_its_module).
OPERATOR_EXPECTED = {
    "tidal_llmservice_replicas": "gauge",
    "tidal_llmservice_served_ratio": "gauge",
    "tidal_llmbatchjob_workers": "gauge",
    "tidal_llmbatchjob_preemptions": "gauge",
    "tidal_batch_goodput_gpu_seconds": "counter",
}


def skip_or_fail(message: str) -> None:
    if os.environ.get("TIDAL_E2E") == "require":
        pytest.fail(message)
    pytest.skip(message)


# -- metric names -----------------------------------------------------------------------------


def family_names(registry: CollectorRegistry) -> dict[str, str]:
    """Each metric family of ``registry`` (its name without suffixes) → its type. Families are
    listed even when no labelled child exists yet."""
    return {family.name: family.type for family in registry.collect()}


def operator_families() -> dict[str, str]:
    """The operator's families: from tidal.operator.metrics when it exists (each module-level
    CollectorRegistry, and each ``*Metrics`` class built without arguments), else the
    expected list above."""
    try:
        module = importlib.import_module("tidal.operator.metrics")
    except ModuleNotFoundError:
        return dict(OPERATOR_EXPECTED)
    out: dict[str, str] = {}
    for name in dir(module):
        value = getattr(module, name)
        if isinstance(value, CollectorRegistry):
            out |= family_names(value)
        elif (
            isinstance(value, type)
            and name.endswith("Metrics")
            and value.__module__ == module.__name__
        ):
            try:
                out |= family_names(value().registry)
            except TypeError as error:  # a constructor with arguments: say so, do not guess
                pytest.fail(f"tidal.operator.metrics.{name}(): {error}; update operator_families")
    assert out, "tidal.operator.metrics: found no registry (a CollectorRegistry or *Metrics class)"
    return out


def registry_families() -> dict[str, str]:
    """Every family tidal's components export: the extender, the node agent, the worker and the
    operator."""
    families: dict[str, str] = {}
    for registry in (
        ExtenderMetrics().registry,
        AgentMetrics("gpu-node-7").registry,
        WorkerMetrics("m").registry,
    ):
        families |= family_names(registry)
    return families | operator_families()


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def exposed_names(families: dict[str, str]) -> set[str]:
    """Sample names as Prometheus stores them: a counter's ``_total``, a histogram's
    ``_bucket``/``_sum``/``_count`` (and the base name, which a dashboard never reads but a
    reader may write)."""
    names = set()
    for name, kind in families.items():
        names.add(name)
        names.update(name + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTORS = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers left after removing strings, label
    matchers, ranges, label lists and variables, that are not functions or keywords."""
    text = _STRINGS.sub('""', expr)
    text = _SELECTORS.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    return {m for m in _IDENTIFIER.findall(text) if m.lower() not in _KEYWORDS}


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'sum by (le, verb) (rate(a_bucket{verb="x y"}[$__rate_interval])) / on (node) '
        'group_left (uuid) b * 2 + time() - max without (gpu) (c{node=~"$node"} offset 5m) '
        "or vector(0) and d > bool 1"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d"}


def test_every_expression_names_an_exposed_metric() -> None:
    known = exposed_names(registry_families())
    unknown = {}
    for where, expr in dashboards.expressions(BOARD):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = {n for n in names if n not in known and not n.startswith(ALLOWED_PREFIXES)}
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"metrics no registry exports: {unknown}"
    read = {n for _, e in dashboards.expressions(BOARD) for n in metric_names(e)}
    assert len({n for n in read if n.startswith("tidal_")}) >= 40, read


def test_variable_queries_name_exposed_metrics() -> None:
    known = exposed_names(registry_families())
    queries = [v for v in BOARD["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in queries} == {"node", "namespace", "model_name"}
    for variable in queries:
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        assert match.group(1) in known, variable["name"]
        assert variable["query"]["query"] == variable["definition"]


def test_the_operator_list_matches_its_module() -> None:
    """Once tidal.operator.metrics exists, the expected list above is what it exports."""
    try:
        importlib.import_module("tidal.operator.metrics")
    except ModuleNotFoundError:
        pytest.skip("tidal.operator.metrics does not exist yet: OPERATOR_EXPECTED stands in")
    families = operator_families()
    assert OPERATOR_EXPECTED.items() <= families.items(), set(OPERATOR_EXPECTED) - set(families)


# -- the generated file -----------------------------------------------------------------------


def test_regeneration_is_stable_and_equals_the_committed_json() -> None:
    text = dashboards.dashboard_json()
    assert text == dashboards.dashboard_json()
    assert generated_files(CHART)[dashboards.PATH] == text  # `make chart` writes it
    committed = (CHART / dashboards.PATH).read_text()
    assert committed == text, "stale dashboard JSON: run `make chart`"
    assert json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


def test_dashboard_identity_and_rows() -> None:
    assert BOARD["title"] == "tidal: GPU pool" and BOARD["uid"] == "tidal-gpu-pool"
    assert [r["title"] for r in ROWS] == [
        "Pool",
        "GPU grid",
        "Preemptions",
        "Pending",
        "Topology",
        "Workloads",
        "Health",
    ]
    assert BOARD["schemaVersion"] >= 36  # the table's cellOptions, datasource objects


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboards.panels_of(BOARD)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)


def test_grid_positions_fit_and_do_not_overlap() -> None:
    boxes = []
    for panel in dashboards.panels_of(BOARD):
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        boxes.append((panel["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (name, x0, y0, x1, y1) in enumerate(boxes):
        for other, u0, v0, u1, v1 in boxes[i + 1 :]:
            assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, f"{name!r} overlaps {other!r}"
    # each row's panels lie between it and the next row
    starts = [r["gridPos"]["y"] for r in ROWS] + [10**6]
    row_of = {}
    current = None
    for panel in BOARD["panels"]:
        if panel["type"] == "row":
            current = panel
            assert panel["gridPos"] == {"h": 1, "w": 24, "x": 0, "y": panel["gridPos"]["y"]}
            continue
        assert current is not None
        row_of[panel["id"]] = ROWS.index(current)
    for panel in PANELS:
        index = row_of[panel["id"]]
        g = panel["gridPos"]
        assert starts[index] < g["y"] and g["y"] + g["h"] <= starts[index + 1], panel["title"]


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    variable = BOARD["templating"]["list"][0]
    assert variable["name"] == "datasource" and variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in PANELS:
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == expected, (panel["title"], t["refId"])
    for v in BOARD["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == expected, v["name"]
    # no data source named any other way (the annotation is Grafana's built-in one)
    uids = set(re.findall(r'"uid": "([^"]*)"', dashboards.dashboard_json()))
    assert uids == {"${datasource}", "-- Grafana --", dashboards.UID}


def test_variables_used_are_defined_and_checkable() -> None:
    defined = {v["name"] for v in BOARD["templating"]["list"]}
    used = {
        name
        for _, expr in dashboards.expressions(BOARD)
        for name in re.findall(r"\$\{?(\w+)", expr)
        if not name.startswith("__")
    }
    assert used <= defined, used - defined
    assert {"node", "namespace", "model_name", "scheduler_job"} <= used
    for _, expr in dashboards.expressions(BOARD):
        assert "$" not in dashboards.as_promql(expr), expr


def test_refids_are_unique_per_panel_and_tables_are_instant() -> None:
    for panel in PANELS:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            if panel["type"] in ("table", "stat"):
                assert t["instant"] and not t["range"], panel["title"]
            if panel["type"] == "table":
                assert t["format"] == "table", panel["title"]


def test_the_gpu_grid_is_a_node_by_gpu_matrix_coloured_by_state() -> None:
    grid = next(p for p in PANELS if p["title"] == "GPU grid")
    assert grid["type"] == "table"
    (expr,) = [t["expr"] for t in grid["targets"]]
    assert "tidal_gpu_state" in expr
    (transformation,) = grid["transformations"]
    assert transformation["id"] == "groupingToMatrix"
    options = transformation["options"]
    assert (options["rowField"], options["columnField"], options["valueField"]) == (
        "node",
        "gpu",
        "Value",
    )
    defaults = grid["fieldConfig"]["defaults"]
    assert defaults["custom"]["cellOptions"]["type"] == "color-background"
    (mapping,) = defaults["mappings"]
    assert mapping["type"] == "value"
    assert {k: v["text"] for k, v in mapping["options"].items()} == {
        str(s.value): s.label for s in GpuState
    }
    assert {v["text"] for v in mapping["options"].values()} == {
        "free",
        "batch",
        "online",
        "reserved",
        "unhealthy",
    }
    assert all(v["color"] for v in mapping["options"].values())
    allocations = next(p for p in PANELS if p["title"] == "Allocations")
    for t in allocations["targets"]:
        assert (
            "tidal_gpu_allocation_info" in t["expr"] and "* on (node, gpu) group_left" in t["expr"]
        )


def test_the_aligned_share_counts_stronger_tiers_as_aligned() -> None:
    expr = dashboards.aligned_share("increase", "1h")
    assert 'requested_tier="nvlink", achieved_tier=~"nvlink"' in expr
    assert 'requested_tier="numa", achieved_tier=~"nvlink|pcie-switch|numa"' in expr
    assert 'mode!="none"' in expr and expr.count("sum by (mode)") == 3


# -- promtool ---------------------------------------------------------------------------------


def promtool() -> Path:
    """promtool: $PROMTOOL, else e2e/build.sh's unpacked Debian package, else the PATH."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    directory = Path(os.environ.get("TIDAL_PROMETHEUS_DIR", str(cache / "tidal" / "prometheus")))
    candidates = [os.environ.get("PROMTOOL"), str(directory / "usr" / "bin" / "promtool")]
    candidates.append(shutil.which("promtool"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    skip_or_fail(
        f"promtool not found (PROMTOOL, {directory}/usr/bin, PATH): fetch it with "
        "`make e2e-binaries` (e2e/build.sh unpacks Debian's prometheus package)"
    )
    raise AssertionError("unreachable")


def check_rules(exprs: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on one recording rule per expression."""
    rules = [
        {"record": f"tidal_dashboard:expr_{i}", "expr": dashboards.as_promql(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "tidal-dashboard", "rules": rules}]}))
    command = [str(promtool()), "check", "rules", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def test_promtool_checks_every_expression(tmp_path: Path) -> None:
    exprs = dashboards.expressions(BOARD)
    result = check_rules(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_refuses_a_bad_expression(tmp_path: Path) -> None:
    """The check above can fail: a missing parenthesis and an unknown function are refused."""
    for bad in ("sum by (le) (rate(x[5m])", "histogram_quantil(0.9, x)"):
        result = check_rules([("bad", bad)], tmp_path)
        assert result.returncode != 0, bad
        assert "expr_0" in result.stdout + result.stderr


# -- the chart's ConfigMap --------------------------------------------------------------------


def helm_template(*sets: str) -> list[dict[str, Any]]:
    helm = default_binaries().path("helm")
    if not os.access(helm, os.X_OK):
        skip_or_fail(f"helm not found at {helm}: build it with `make e2e-binaries`")
    command = [str(helm), "template", "tidal", str(CHART), "-n", NAMESPACE]
    command += ["--kube-version", K8S_VERSION]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def dashboard_maps(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("tidal-dashboard-")
    ]


def test_the_chart_ships_the_dashboard_as_a_configmap() -> None:
    assert dashboard_maps(helm_template()) == []  # dashboards.enabled is false by default
    (config_map,) = dashboard_maps(helm_template("dashboards.enabled=true"))
    meta = config_map["metadata"]
    assert meta["name"] == "tidal-dashboard-tidal-pool" and meta["namespace"] == NAMESPACE
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/component"] == "dashboards"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "tidal"
    assert "annotations" not in meta
    assert list(config_map["data"]) == ["tidal-pool.json"]
    shipped = config_map["data"]["tidal-pool.json"]
    assert json.loads(shipped) == BOARD
    assert shipped == (CHART / dashboards.PATH).read_text().rstrip("\n")
    kubernetes_validate.validate(config_map, K8S_VERSION.rsplit(".", 1)[0] + ".0", strict=True)


def test_the_dashboard_configmap_follows_its_values() -> None:
    (config_map,) = dashboard_maps(
        helm_template(
            "dashboards.enabled=true",
            "dashboards.namespace=monitoring",
            "dashboards.labels.grafana_dashboard=null",
            "dashboards.labels.grafana=tidal",
            "dashboards.annotations.grafana_folder=GPUs",
        )
    )
    meta = config_map["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana"] == "tidal" and "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "GPUs"}

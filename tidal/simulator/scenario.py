"""Simulation scenarios: documented defaults, loadable from YAML with errors that name the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tidal.placement import POLICY_NAMES, SCORING_STRATEGIES, TopologyMode
from tidal.simulator.cluster_model import PresetTable
from tidal.simulator.formats import CLASSES, FIELDS, KINDS, Kind, find_format, unit_factor
from tidal.simulator.throughput import DERIVED_TIER_THROUGHPUT
from tidal.topology import Tier, preset_names


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class ScenarioService:
    """One online LLM service: replicas of ``tensor_parallel`` GPUs each."""

    name: str
    tensor_parallel: int
    share: float  # fraction of the online GPU demand this service carries
    mode: TopologyMode = TopologyMode.GUARANTEED
    tier: Tier = Tier.NVLINK


# The default mix must be placeable on the openb cluster, whose 8-GPU nodes are mostly PCIe
# (L40S-like, 4 GPUs per NUMA node) with a few DGX-1s: TP4 asks for one NUMA node (guaranteed),
# which PCIe and NVLink nodes can both give; TP2 prefers NVLink but takes a PCIe switch.
DEFAULT_SERVICES = (
    ScenarioService("chat-8b", 1, 0.25, TopologyMode.NONE, Tier.NODE),
    ScenarioService("code-34b", 2, 0.3, TopologyMode.BEST_EFFORT, Tier.NVLINK),
    ScenarioService("chat-70b", 4, 0.35, TopologyMode.GUARANTEED, Tier.NUMA),
    ScenarioService("reason-70b", 4, 0.1, TopologyMode.BEST_EFFORT, Tier.NVLINK),
)

# Served throughput of a tensor-parallel replica by the tier its GPUs are aligned at, relative
# to NVLink (a stated model, swept in the report): all-reduce over PCIe switches, host bridges
# and sockets costs a growing share of every layer.
DEFAULT_TIER_THROUGHPUT = dict(DERIVED_TIER_THROUGHPUT)  # the stated model, throughput.py


@dataclass(frozen=True)
class TraceSource:
    """A trace file and how to read it (docs/traces.md). In YAML, a bare string is ``path``."""

    path: str  # a path (relative to the scenario file's folder) or a URI (file://, s3://, ...)
    format: str | None = None  # a format of formats.py; None: told by the file's header
    columns: Mapping[str, str] = field(default_factory=dict)  # field -> the file's column
    units: Mapping[str, str] = field(default_factory=dict)  # field -> unit of its column
    defaults: Mapping[str, float | str] = field(default_factory=dict)  # for absent/empty cells
    classes: Mapping[str, str] = field(default_factory=dict)  # jobs: value -> online|batch|drop
    resources_per: str | None = None  # jobs: GPUs, CPU, memory per "worker" or per "job"
    arrivals: str = "sampled"  # jobs: "sampled" (Poisson at batch_load) or "trace" (submit times)
    start_s: float | None = None  # jobs, arrivals trace: the replay's t=0 (default: first submit)
    on_unmapped: str = "error"  # nodes: a node with no topology preset: "error" or "drop"


# Which TraceSource keys each kind of file takes (beyond path, format, columns, units, defaults).
_SOURCE_KEYS: dict[Kind, tuple[str, ...]] = {
    "nodes": ("on_unmapped",),
    "jobs": ("classes", "resources_per", "arrivals", "start_s"),
    "load": (),
}
_COMMON_KEYS = ("path", "format", "columns", "units", "defaults")


@dataclass(frozen=True)
class Scenario:
    name: str = "openb-default"
    seed: int = 7
    hours: float = 24.0
    step_s: float = 300.0  # autoscaler and metrics period
    # "openb" (the bundled openb GPU nodes), "synthetic" (synthetic_nodes) or "trace" (the
    # node list in ``nodes``; a scenario that names ``nodes`` is a trace cluster)
    cluster: str = "openb"
    synthetic_nodes: dict[str, int] = field(default_factory=lambda: {"dgx1-v100": 32})
    max_nodes: int | None = None  # sample this many nodes of the node list (None: all)
    batch_load: float = 1.0  # offered batch GPU demand / cluster GPUs (batch fills what is left)
    max_batch_hours: float = 8.0  # batch durations are capped at this
    online_peak: float = 0.45  # online GPU demand at the daily peak, fraction of cluster GPUs
    checkpoint_interval_s: float = 1800.0
    grace_period_s: float = 30.0  # victims' termination grace; the preemptor binds after it
    preemption_window_s: float = 600.0  # M2: a preemptor bound within this counts as a success
    services: tuple[ScenarioService, ...] = DEFAULT_SERVICES
    tier_throughput: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_THROUGHPUT))
    policies: tuple[str, ...] = POLICY_NAMES
    baseline_scoring: str = "most-allocated"  # the baselines' node scoring (NodeResourcesFit)
    data_dir: Path | None = None  # default: ../shared/data beside the checkout
    nodes: TraceSource | None = None  # the node list (cluster "trace")
    jobs: TraceSource | None = None  # job/pod list; default: the openb default pod list
    load: TraceSource | None = None  # online load shape; default: the GenAI gateway's QPS
    presets: dict[str, str] = field(default_factory=dict)  # GPU model or MODEL/COUNT -> preset
    # "services": online demand is ``services`` scaled by the load shape (the trace's online
    # rows are counted, not replayed); "trace": the trace's online rows are replayed at their
    # submission times (needs jobs.arrivals: trace; services and load are not used)
    online: str = "services"

    def quick(self) -> Scenario:
        """The same scenario on a sample of the cluster (160 nodes of the openb or trace node
        list, or a quarter of each synthetic preset), for a run of seconds."""
        quarter = {preset: max(1, count // 4) for preset, count in self.synthetic_nodes.items()}
        return dataclasses.replace(
            self,
            max_nodes=min(self.max_nodes or 160, 160),
            synthetic_nodes=quarter,
            step_s=600.0,
        )


BUNDLED = Path(__file__).with_name("scenarios")


def bundled_scenarios() -> list[str]:
    """Names of the scenario files shipped with tidal (``tidal/simulator/scenarios``)."""
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def load_scenario(path: Path) -> Scenario:
    """A scenario from a YAML file, or a bundled scenario by name (see bundled_scenarios)."""
    if not path.exists() and (BUNDLED / f"{path}.yaml").is_file():
        path = BUNDLED / f"{path}.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ScenarioError(
            f"{path}: cannot read scenario: {err.strerror} (bundled scenarios: "
            f"{', '.join(bundled_scenarios())})"
        ) from err
    except yaml.YAMLError as err:
        raise ScenarioError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise ScenarioError(f"{path}: expected a mapping of scenario fields")
    return scenario_from_mapping(spec, str(path), path.parent)


def scenario_from_mapping(
    spec: dict[str, Any], source: str = "scenario", base: Path | None = None
) -> Scenario:
    """A scenario from parsed YAML; relative trace paths are taken from ``base`` (the scenario
    file's folder; default: the working directory)."""
    known = {f.name for f in dataclasses.fields(Scenario)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ScenarioError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    values = dict(spec)
    try:
        if "services" in values:
            values["services"] = tuple(_service(s, i) for i, s in enumerate(values["services"]))
        if "policies" in values:
            values["policies"] = tuple(values["policies"])
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        for kind in KINDS:
            if values.get(kind) is not None:
                values[kind] = _trace_source(kind, values[kind], base or Path.cwd())
        if values.get("nodes") is not None and "cluster" not in values:
            values["cluster"] = "trace"
        if "presets" in values:
            values["presets"] = _presets(values["presets"])
        scenario = Scenario(**values)
        _validate(scenario)
    except (TypeError, ValueError, KeyError) as err:
        raise ScenarioError(f"{source}: {err}") from err
    return scenario


def _trace_source(kind: Kind, spec: Any, base: Path) -> TraceSource:
    where = f"field {kind!r}"
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a path or a mapping with 'path'")
    allowed = (*_COMMON_KEYS, *_SOURCE_KEYS[kind])
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {list(allowed)}")
    if "path" not in spec:
        raise ValueError(f"{where}: missing 'path' (the {kind} file)")
    values = dict(spec)
    values["path"] = _resolve(str(spec["path"]), base)
    for key in ("columns", "units", "defaults", "classes"):
        if key in values:
            values[key] = _mapping(values[key], f"{where}.{key}")
    if values.get("start_s") is not None:
        values["start_s"] = _number(values["start_s"], f"{where}.start_s")
    try:
        source = TraceSource(**values)
        _check_source(kind, source)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return source


def _resolve(path: str, base: Path) -> str:
    """A URI stays as written; a relative path is taken from the scenario file's folder."""
    if "://" in path:
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping")
    return {str(k): v for k, v in value.items()}


def _check_source(kind: Kind, source: TraceSource) -> None:
    fields = FIELDS[kind]
    if source.format is not None:
        find_format(kind, source.format)
    for key in (*source.columns, *source.units, *source.defaults):
        if key not in fields:
            raise ValueError(f"unknown field {key!r}; the {kind} fields: {', '.join(fields)}")
    for name, unit in source.units.items():
        unit_factor(kind, name, str(unit))
    for name, value in source.defaults.items():
        if name == "class" and value not in CLASSES:
            raise ValueError(f"defaults.class: {value!r} is not one of {', '.join(CLASSES)}")
        if fields[name].dimension != "text":
            _number(value, f"defaults.{name}")
    for value, cls in source.classes.items():
        if cls not in CLASSES:
            raise ValueError(f"classes[{value!r}]: {cls!r} is not one of {', '.join(CLASSES)}")
    choices = {
        "resources_per": (None, "worker", "job"),
        "arrivals": ("sampled", "trace"),
        "on_unmapped": ("error", "drop"),
    }
    for key, allowed in choices.items():
        if getattr(source, key) not in allowed:
            shown = ", ".join(a for a in allowed if a)
            raise ValueError(f"{key}: {getattr(source, key)!r} is not one of {shown}")


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: not a number: {value!r}") from None


def _presets(value: Any) -> dict[str, str]:
    table = {str(k): str(v) for k, v in _mapping(value, "field 'presets'").items()}
    try:
        PresetTable.parse(table)
    except ValueError as err:
        raise ValueError(f"field 'presets': {err}") from err
    return table


def _service(spec: Any, index: int) -> ScenarioService:
    where = f"field 'services[{index}]'"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping")
    try:
        return ScenarioService(
            name=str(spec["name"]),
            tensor_parallel=int(spec["tensor_parallel"]),
            share=float(spec["share"]),
            mode=TopologyMode(spec.get("mode", "guaranteed")),
            tier=Tier.parse(spec.get("tier", "nvlink")),
        )
    except KeyError as err:
        raise ValueError(f"{where}: missing {err}") from err
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _validate(s: Scenario) -> None:
    checks = [
        (s.hours > 0, "hours", "must be > 0"),
        (s.step_s > 0, "step_s", "must be > 0"),
        (
            s.cluster in ("openb", "synthetic", "trace"),
            "cluster",
            "must be 'openb', 'synthetic' or 'trace'",
        ),
        (
            (s.cluster == "trace") == (s.nodes is not None),
            "nodes",
            "a trace cluster needs a node list, and only a trace cluster reads one "
            f"(cluster is {s.cluster!r})",
        ),
        (s.online in ("services", "trace"), "online", "must be 'services' or 'trace'"),
        (
            s.online == "services" or (s.jobs is not None and s.jobs.arrivals == "trace"),
            "online",
            "'trace' replays the trace's own times: set `jobs: {arrivals: trace}`",
        ),
        (0 <= s.batch_load <= 2, "batch_load", "must be within 0..2"),
        (0 <= s.online_peak <= 1, "online_peak", "must be within 0..1"),
        (s.checkpoint_interval_s > 0, "checkpoint_interval_s", "must be > 0"),
        (s.max_nodes is None or s.max_nodes > 0, "max_nodes", "must be > 0"),
        (all(p in POLICY_NAMES for p in s.policies), "policies", f"each one of {POLICY_NAMES}"),
        (
            s.baseline_scoring in SCORING_STRATEGIES,
            "baseline_scoring",
            f"one of {SCORING_STRATEGIES}",
        ),
        (all(n in preset_names() for n in s.synthetic_nodes), "synthetic_nodes", "unknown preset"),
        (all(t.tensor_parallel in (1, 2, 4, 8) for t in s.services), "services", "TP in 1,2,4,8"),
    ]
    for ok, name, problem in checks:
        if not ok:
            raise ValueError(f"field {name!r}: {problem}")

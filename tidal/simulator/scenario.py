"""Simulation scenarios: documented defaults, loadable from YAML with errors that name the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tidal.placement import POLICY_NAMES, SCORING_STRATEGIES, TopologyMode
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
DEFAULT_TIER_THROUGHPUT = {
    "nvlink": 1.0,
    "pcie-switch": 0.8,
    "numa": 0.7,
    "socket": 0.6,
    "node": 0.5,
}


@dataclass(frozen=True)
class Scenario:
    name: str = "openb-default"
    seed: int = 7
    hours: float = 24.0
    step_s: float = 300.0  # autoscaler and metrics period
    cluster: str = "openb"  # "openb" (the trace's GPU nodes) or "synthetic"
    synthetic_nodes: dict[str, int] = field(default_factory=lambda: {"dgx1-v100": 32})
    max_nodes: int | None = None  # sample this many openb nodes (None: all)
    batch_load: float = 1.0  # offered batch GPU demand / cluster GPUs (batch fills what is left)
    max_batch_hours: float = 8.0  # trace durations are capped at this
    online_peak: float = 0.45  # online GPU demand at the daily peak, fraction of cluster GPUs
    checkpoint_interval_s: float = 1800.0
    grace_period_s: float = 30.0  # victims' termination grace; the preemptor binds after it
    preemption_window_s: float = 600.0  # M2: a preemptor bound within this counts as a success
    services: tuple[ScenarioService, ...] = DEFAULT_SERVICES
    tier_throughput: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_THROUGHPUT))
    policies: tuple[str, ...] = POLICY_NAMES
    baseline_scoring: str = "most-allocated"  # the baselines' node scoring (NodeResourcesFit)
    data_dir: Path | None = None  # default: ../shared/data beside the checkout

    def quick(self) -> Scenario:
        """The same scenario on a sample of the cluster (160 openb nodes, or a quarter of each
        synthetic preset), for a run of seconds."""
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
    return scenario_from_mapping(spec, str(path))


def scenario_from_mapping(spec: dict[str, Any], source: str = "scenario") -> Scenario:
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
        scenario = Scenario(**values)
        _validate(scenario)
    except (TypeError, ValueError, KeyError) as err:
        raise ScenarioError(f"{source}: {err}") from err
    return scenario


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
        (s.cluster in ("openb", "synthetic"), "cluster", "must be 'openb' or 'synthetic'"),
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

"""tidal.simulator: trace-driven replay of online services and batch jobs through the same
placement core the extender runs, every policy on the same event stream. Node lists, job lists
and load shapes in several public trace formats, or the tidal CSV schema (docs/traces.md)."""

from tidal.simulator.data import DataError
from tidal.simulator.run import prepare, simulate
from tidal.simulator.scenario import Scenario, ScenarioError, TraceSource, load_scenario

__all__ = [
    "DataError",
    "Scenario",
    "ScenarioError",
    "TraceSource",
    "load_scenario",
    "prepare",
    "simulate",
]

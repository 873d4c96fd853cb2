"""tidal.simulator: trace-driven replay of online services and batch jobs through the same
placement core the extender runs, every policy on the same event stream."""

from tidal.simulator.run import simulate
from tidal.simulator.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario", "simulate"]

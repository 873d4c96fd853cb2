"""tidal.placement: the pure placement and preemption core shared by the extender, the
simulator and the benchmarks. No I/O; imports only :mod:`tidal.topology` of tidal."""

from tidal.placement.cost import COMPONENTS, DEFAULT_ORDER, Cost, CostOrder
from tidal.placement.demand import Demand, DemandMix
from tidal.placement.fit import (
    FilterResult,
    Placement,
    best_placement,
    choose_gpus,
    filter_nodes,
    first_free_gpus,
    fit_node,
)
from tidal.placement.gang import Assignment, GangPlan, plan_gang
from tidal.placement.plan import NoPlan, Plan, PlanResult
from tidal.placement.planner import TopologyFirstPlanner, plan_cost
from tidal.placement.policies import (
    POLICY_NAMES,
    SCORING_STRATEGIES,
    AnchorLike,
    KubernetesDefault,
    Policy,
    SubsetEnumeration,
    TidalPolicy,
    make_policy,
)
from tidal.placement.request import GangRequest, PodRequest, TopologyMode, default_topology
from tidal.placement.snapshot import (
    ClusterSnapshot,
    NodeInfo,
    NodeState,
    PdbInfo,
    PodInfo,
    Reservation,
)
from tidal.placement.status import Code, Rejection

__all__ = [
    "COMPONENTS",
    "DEFAULT_ORDER",
    "POLICY_NAMES",
    "SCORING_STRATEGIES",
    "AnchorLike",
    "Assignment",
    "ClusterSnapshot",
    "Code",
    "Cost",
    "CostOrder",
    "Demand",
    "DemandMix",
    "FilterResult",
    "GangPlan",
    "GangRequest",
    "KubernetesDefault",
    "NoPlan",
    "NodeInfo",
    "NodeState",
    "PdbInfo",
    "Placement",
    "Plan",
    "PlanResult",
    "PodInfo",
    "PodRequest",
    "Policy",
    "Rejection",
    "Reservation",
    "SubsetEnumeration",
    "TidalPolicy",
    "TopologyFirstPlanner",
    "TopologyMode",
    "best_placement",
    "choose_gpus",
    "default_topology",
    "filter_nodes",
    "first_free_gpus",
    "fit_node",
    "make_policy",
    "plan_cost",
    "plan_gang",
]

"""The KubeSchedulerConfiguration that puts tidal's extender behind kube-scheduler: the
`tidal-scheduler` profile beside the default one, the extender's verbs, `nvidia.com/gpu` as its
managed resource, TLS to reach it, and `percentageOfNodesToScore: 100` (otherwise the extender
never sees most nodes of a large cluster). Used by the local control plane, by `tidal
scheduler-config`, and by the Helm chart.

The local control plane's kube-scheduler is the cluster's only one, so it serves both profiles
and keeps its lease in kube-system. The chart's runs beside the cluster's own: it must serve
only `tidal-scheduler` (``profiles=SECOND_SCHEDULER``; `extenders` apply to every profile, so a
`default-scheduler` profile there would be a second default scheduler calling tidal's extender)
and keeps its lease in the release's namespace (``lease_namespace``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tidal.api import GPU_RESOURCE, SCHEDULER_NAME

DEFAULT_SCHEDULER = "default-scheduler"
BOTH_PROFILES = (DEFAULT_SCHEDULER, SCHEDULER_NAME)  # the cluster's only kube-scheduler
SECOND_SCHEDULER = (SCHEDULER_NAME,)  # a kube-scheduler beside the cluster's own (the chart)


@dataclass(frozen=True)
class ExtenderConfig:
    """How kube-scheduler reaches tidal's extender (the `extenders` entry)."""

    url_prefix: str
    preempt: bool = True
    bind: bool = True
    node_cache_capable: bool = True
    timeout_s: float = 5.0
    ca_file: str | None = None  # verifies the extender's serving certificate (https only)
    # kube-scheduler's client certificate: the extender serves only callers presenting one
    cert_file: str | None = None
    key_file: str | None = None
    weight: int = 5

    def __post_init__(self) -> None:
        if not self.url_prefix.startswith(("http://", "https://")):
            raise ValueError(
                f"extender URL {self.url_prefix!r} must start with http:// or https://"
            )
        if (self.ca_file or self.cert_file or self.key_file) and not self.https:
            raise ValueError("TLS files only apply to an https:// extender URL")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate and its key go together")

    @property
    def https(self) -> bool:
        return self.url_prefix.startswith("https://")

    def as_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "urlPrefix": self.url_prefix,
            "filterVerb": "filter",
            "prioritizeVerb": "prioritize",
            "weight": self.weight,
            "nodeCacheCapable": self.node_cache_capable,
            "enableHTTPS": self.https,
            "httpTimeout": f"{self.timeout_s}s",
            "managedResources": [{"name": GPU_RESOURCE, "ignoredByScheduler": False}],
            # Not ignorable: without the extender a GPU pod would get GPUs no one chose.
            "ignorable": False,
        }
        if self.preempt:
            entry["preemptVerb"] = "preempt"
        if self.bind:
            entry["bindVerb"] = "bind"
        tls = {"caFile": self.ca_file, "certFile": self.cert_file, "keyFile": self.key_file}
        if any(tls.values()):
            entry["tlsConfig"] = {key: value for key, value in tls.items() if value}
        return entry


def scheduler_configuration(
    extender: ExtenderConfig | None,
    *,
    kubeconfig: str | None = None,
    qps: int = 5000,
    leader_elect: bool = False,
    profiles: Sequence[str] = BOTH_PROFILES,
    lease_namespace: str = "kube-system",
    percentage_of_nodes_to_score: int = 100,
) -> dict[str, Any]:
    """The configuration object; ``kubeconfig`` None means in-cluster credentials. Client QPS
    is raised because client-go's defaults (50/100) cap scheduling throughput. ``profiles``
    are the scheduler names served (each a profile of in-tree defaults); the leader-election
    lease, named ``tidal-scheduler``, lives in ``lease_namespace``."""
    if not profiles:
        raise ValueError("a scheduler configuration needs at least one profile")
    if not 0 <= percentage_of_nodes_to_score <= 100:
        raise ValueError(
            f"percentageOfNodesToScore {percentage_of_nodes_to_score} is not within 0..100"
        )
    connection: dict[str, Any] = {"qps": qps, "burst": qps * 2}
    if kubeconfig is not None:
        connection["kubeconfig"] = kubeconfig
    config: dict[str, Any] = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": connection,
        "leaderElection": {"leaderElect": leader_elect},
        "percentageOfNodesToScore": percentage_of_nodes_to_score,
        "profiles": [{"schedulerName": name} for name in profiles],
    }
    if leader_elect:
        config["leaderElection"]["resourceName"] = SCHEDULER_NAME
        config["leaderElection"]["resourceNamespace"] = lease_namespace
    if extender is not None:
        config["extenders"] = [extender.as_config()]
    return config

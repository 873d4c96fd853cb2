"""The KubeSchedulerConfiguration that puts tidal's extender behind kube-scheduler: the
`tidal-scheduler` profile beside the default one, the extender's verbs, `nvidia.com/gpu` as its
managed resource, TLS to reach it, and `percentageOfNodesToScore: 100` (otherwise the extender
never sees most nodes of a large cluster). Used by the local control plane, by `tidal
scheduler-config`, and by the Helm chart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidal.api import GPU_RESOURCE, SCHEDULER_NAME


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
) -> dict[str, Any]:
    """The configuration object; ``kubeconfig`` None means in-cluster credentials. Client QPS
    is raised because client-go's defaults (50/100) cap scheduling throughput."""
    connection: dict[str, Any] = {"qps": qps, "burst": qps * 2}
    if kubeconfig is not None:
        connection["kubeconfig"] = kubeconfig
    config: dict[str, Any] = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": connection,
        "leaderElection": {"leaderElect": leader_elect},
        "percentageOfNodesToScore": 100,
        "profiles": [{"schedulerName": "default-scheduler"}, {"schedulerName": SCHEDULER_NAME}],
    }
    if leader_elect:
        config["leaderElection"]["resourceName"] = SCHEDULER_NAME
        config["leaderElection"]["resourceNamespace"] = "kube-system"
    if extender is not None:
        config["extenders"] = [extender.as_config()]
    return config

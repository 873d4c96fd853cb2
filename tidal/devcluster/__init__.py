"""A real local Kubernetes control plane for tests, demos and benchmarks.

etcd, kube-apiserver, kube-scheduler (profile ``tidal-scheduler``), optionally
kube-controller-manager, and KWOK simulating GPU nodes, all on 127.0.0.1 in one temporary
directory. Binaries are built from Go modules by ``build.sh`` into a cache outside the repository.
"""

from tidal.devcluster.binaries import Binaries, DevClusterError, find_binaries
from tidal.devcluster.cluster import ClusterOptions, LocalCluster

__all__ = [
    "Binaries",
    "ClusterOptions",
    "DevClusterError",
    "LocalCluster",
    "find_binaries",
]

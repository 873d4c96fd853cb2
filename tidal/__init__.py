"""tidal: topology-aware placement and preemption for LLM workloads on shared Kubernetes GPU
clusters."""

__version__ = "0.1.0"

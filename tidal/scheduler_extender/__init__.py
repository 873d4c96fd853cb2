"""The kube-scheduler HTTP extender: filter, prioritize, preempt and bind over tidal.placement.

docs/architecture.md explains the protocol, its two preemption paths (kube-scheduler's preempt
verb, and the extender's own evictions for the topology-only conflict) and the reservations.
"""

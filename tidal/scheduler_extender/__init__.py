"""The kube-scheduler HTTP extender: filter, prioritize, preempt and bind over tidal.placement.

See shared/design/SCHEDULING.md sections 4 and 5 for the protocol and its traps.
"""

"""The node agent, run on every GPU node as a DaemonSet: it discovers the GPUs and how they are
linked (NVML and sysfs, or a preset when testing), publishes that as the node's GPUTopology and
labels, serves the kubelet device plugin that hands each pod the GPUs the scheduler extender
chose, and reports GPU health and metrics. It can also run worker groups without Kubernetes.
"""

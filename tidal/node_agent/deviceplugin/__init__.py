"""The kubelet device plugin for GPUs: a gRPC server on a unix socket in the kubelet's plugin
directory that registers the GPU resource, streams each GPU's health, and answers the
kubelet's allocation calls with exactly the GPUs tidal assigned to the pod being admitted.
"""

"""The kubelet's device plugin API, version v1beta1: ``api.proto`` as Kubernetes publishes it,
and the ``api_pb2*`` modules ``grpc_tools.protoc`` generates from it with ``make protos``.
Do not edit the generated modules by hand: a test checks that they match the proto.
"""

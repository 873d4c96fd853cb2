"""tidal.inference_worker: the pod's container (model, tensor-parallel runtime, kernels, server).

Only the kernels exist so far (:mod:`tidal.inference_worker.kernels`)."""

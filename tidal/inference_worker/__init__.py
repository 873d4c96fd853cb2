"""tidal.inference_worker: the process in every workload pod. It loads a Llama-family
checkpoint (Hugging Face safetensors or GGUF, :mod:`.weights`), shards it over the pod's GPUs or
CPU processes with tensor parallelism (:mod:`.parallel`), and runs prefill serially or with
sequence-level overlap of computation and communication (:mod:`.iso`) over SDPA or the INT8
FlashAttention kernel (:mod:`.kernels`). ``tidal worker generate`` is its first command; the
serving engine and the batch runner come next.
"""

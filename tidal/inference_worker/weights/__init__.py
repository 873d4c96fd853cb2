"""Checkpoints to tensors: Hugging Face directories (config.json + safetensors) and GGUF files,
both read through one :class:`~tidal.inference_worker.weights.source.TensorSource` that names
tensors as Hugging Face does and lets each tensor-parallel rank read only its slice."""

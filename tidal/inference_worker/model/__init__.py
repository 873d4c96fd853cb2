"""The decoder: a pure :class:`ModelSpec` (dimensions, heads, RoPE, norms) and one Llama-family
implementation for the ``llama``, ``mistral`` and ``qwen2`` architectures."""

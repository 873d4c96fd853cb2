"""The serving engine: paged KV cache, continuous batching, prefix cache, sampling."""

"""The worker's Prometheus metrics: vLLM v1's names (``vllm:X`` is ``tidal_X``) with the label
``model_name``, plus tidal's own (prefill mode, all-reduce time, batch records, checkpoints).

One :class:`WorkerMetrics` per process, on its own registry: the engine, the server and the
batch runner update it; ``/metrics`` (or the batch runner's metrics port) exposes it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read these.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ALLREDUCE_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WorkerMetrics:
    """Every metric the worker exports, bound to its ``model_name``."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, m, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*m, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=r)

        self.running = gauge("tidal_num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("tidal_num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("tidal_kv_cache_usage_perc", "KV cache usage (1 = 100%).")
        self._prompt_tokens = counter("tidal_prompt_tokens", "Prefill tokens processed.")
        self._generation_tokens = counter("tidal_generation_tokens", "Tokens generated.")
        self._success = counter("tidal_request_success", "Finished requests.", ("finished_reason",))
        self._preemptions = counter("tidal_num_preemptions", "Sequences preempted (recompute).")
        self._prefix_queries = counter("tidal_prefix_cache_queries", "Prompt tokens looked up.")
        self._prefix_hits = counter("tidal_prefix_cache_hits", "Prompt tokens found cached.")
        self.ttft = histogram(
            "tidal_time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "tidal_inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "tidal_e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "tidal_request_queue_time_seconds", "Time waiting.", REQUEST_LATENCY_BUCKETS
        )
        self.prefill_time = histogram(
            "tidal_request_prefill_time_seconds", "Time in prefill.", REQUEST_LATENCY_BUCKETS
        )
        self.decode_time = histogram(
            "tidal_request_decode_time_seconds", "Time in decode.", REQUEST_LATENCY_BUCKETS
        )
        self.iteration_tokens = histogram(
            "tidal_iteration_tokens_total", "Tokens per engine step.", ITERATION_TOKEN_BUCKETS
        )
        self._prefill_mode = counter("tidal_prefill", "Prefills by schedule.", ("mode",))
        self.allreduce = histogram(
            "tidal_allreduce_seconds", "All-reduce time (rank 0).", ALLREDUCE_BUCKETS
        )
        self._batch_records = counter("tidal_batch_records", "Batch records written.", ("status",))
        self._batch_checkpoints = counter("tidal_batch_checkpoints", "Checkpoints written.")
        for name in ("running", "waiting", "kv_usage", "ttft", "itl", "e2e", "queue_time",
                     "prefill_time", "decode_time", "iteration_tokens", "allreduce"):  # fmt: skip
            setattr(self, name, getattr(self, name).labels(model_name))

    # Counters with a label besides model_name take it as an argument.
    def prompt_tokens(self, n: int) -> None:
        self._prompt_tokens.labels(self.model_name).inc(n)

    def generation_tokens(self, n: int) -> None:
        self._generation_tokens.labels(self.model_name).inc(n)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def preempted(self, n: int = 1) -> None:
        self._preemptions.labels(self.model_name).inc(n)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self._prefix_queries.labels(self.model_name).inc(queried)
        self._prefix_hits.labels(self.model_name).inc(hit)

    def prefill(self, mode: str) -> None:
        self._prefill_mode.labels(self.model_name, mode).inc()

    def batch_record(self, status: str) -> None:
        self._batch_records.labels(self.model_name, status).inc()

    def batch_checkpoint(self) -> None:
        self._batch_checkpoints.labels(self.model_name).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

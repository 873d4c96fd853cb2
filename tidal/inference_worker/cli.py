"""``tidal worker``: the inference worker's commands. ``generate`` answers one prompt with a real
model and prints its timing: the smallest real use, and the harness the benchmarks use.

torch and the model code are imported only when a command runs, so ``tidal --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import torch

    from tidal.inference_worker.generate import Generation

app = typer.Typer(
    help="The inference worker: serve the OpenAI API, run a batch shard, or answer one prompt."
)

ATTENTION = ("sdpa", "int8")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GenerateJob:
    """What every rank needs to run one generation (picklable: ranks are spawned)."""

    model: str
    prompt: str
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    attention: str
    dtype: str
    iso: bool
    iso_min_tokens: int


def _torch_dtype(name: str) -> torch.dtype:
    import torch  # noqa: PLC0415

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def run_job(comm: Any, device: Any, job: GenerateJob) -> dict[str, Any] | None:
    """One rank's part: load its shard, generate in lockstep; rank 0 returns the result."""
    from tidal.inference_worker.engine.params import SamplingParams  # noqa: PLC0415
    from tidal.inference_worker.generate import generate  # noqa: PLC0415
    from tidal.inference_worker.iso import measure_costs  # noqa: PLC0415
    from tidal.inference_worker.model.llama import LlamaModel  # noqa: PLC0415
    from tidal.inference_worker.weights.resolve import load_checkpoint  # noqa: PLC0415

    checkpoint = load_checkpoint(job.model)
    model = LlamaModel(
        checkpoint.spec, checkpoint.source, comm, _torch_dtype(job.dtype), device, job.attention
    )
    tokenizer = checkpoint.tokenizer
    if job.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": job.prompt}])
    else:
        ids = tokenizer.encode(job.prompt)
    costs = measure_costs(model) if job.iso and comm.world > 1 else None
    sampling = SamplingParams(job.max_tokens, job.temperature, job.top_p, job.top_k, job.seed)
    result = generate(model, ids, sampling, frozenset(tokenizer.eos_token_ids), costs=costs,
                      iso_min_tokens=job.iso_min_tokens)  # fmt: skip
    if comm.rank != 0:
        return None
    return {"text": tokenizer.decode(result.token_ids), "generation": result}


def _run(job: GenerateJob, tp: int) -> dict[str, Any]:
    if tp == 1:
        from tidal.inference_worker.parallel.comm import LocalComm  # noqa: PLC0415

        outcome = run_job(LocalComm(), "cpu", job)
    else:
        from tidal.inference_worker.parallel.launch import launch  # noqa: PLC0415
        from tidal.inference_worker.weights.resolve import load_checkpoint  # noqa: PLC0415

        # Refuse a bad model or TP here, with its message, not as a traceback from a rank.
        load_checkpoint(job.model).spec.check_tensor_parallel(tp)
        outcome = launch(run_job, tp, job, timeout=3600)[0]
    assert outcome is not None
    return outcome


def _report(generation: Generation, tp: int) -> str:
    prefill = f"ISO split at {generation.iso_split}" if generation.iso_split else "serial"
    return (
        f"[{generation.prompt_tokens} prompt tokens: prefill {generation.prefill_s * 1e3:.0f} ms "
        f"({generation.prefill_tokens_per_s:.1f} tok/s, {prefill}); {len(generation.token_ids)} "
        f"generated: decode {generation.decode_tokens_per_s:.1f} tok/s; TP {tp}; finish "
        f"{generation.finish_reason}]"
    )


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Option(help="The prompt (a user message with --chat).")],
    model: Annotated[
        str,
        typer.Option(
            envvar="TIDAL_MODEL_URI",
            help="file:///path, pvc://claim/path, hf://org/name (local cache), or 'smollm2' for "
            "the bundled SmolLM2-135M-Instruct GGUF.",
        ),
    ] = "smollm2",
    chat: Annotated[bool, typer.Option(help="Render the prompt with the chat template.")] = True,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="0: off.")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    tp: Annotated[
        int, typer.Option(envvar="TIDAL_TENSOR_PARALLEL", min=1, help="Tensor-parallel ranks.")
    ] = 1,
    attention: Annotated[
        str, typer.Option(envvar="TIDAL_ATTENTION", help="sdpa or int8.")
    ] = "sdpa",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    iso: Annotated[bool, typer.Option(help="ISO prefill when TP > 1 and it pays.")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of text.")
    ] = False,
) -> None:
    """Answer one prompt and print the continuation and its timing."""
    if attention not in ATTENTION:
        raise typer.BadParameter(f"--attention: {attention!r} is not one of sdpa, int8")
    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    from tidal.inference_worker.model.spec import SpecError  # noqa: PLC0415

    uri = str(_bundled()) if model == "smollm2" else model
    job = GenerateJob(uri, prompt, chat, max_tokens, temperature, top_p, top_k, seed, attention,
                      dtype, iso, int(os.environ.get("TIDAL_ISO_MIN_TOKENS", "256")))  # fmt: skip
    from tidal.inference_worker.parallel.launch import RankError  # noqa: PLC0415

    try:
        outcome = _run(job, tp)
    except (SpecError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error
    except RankError as error:  # the message carries the failing rank's traceback
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1) from error
    generation = outcome["generation"]
    if as_json:
        summary = {"text": outcome["text"], "token_ids": generation.token_ids,
                   "prompt_tokens": generation.prompt_tokens, "prefill_s": generation.prefill_s,
                   "decode_s": generation.decode_s, "finish_reason": generation.finish_reason,
                   "iso_split": generation.iso_split, "tp": tp}  # fmt: skip
        typer.echo(json.dumps(summary))
        return
    typer.echo(outcome["text"])
    typer.echo(_report(generation, tp), err=True)


# -- serve and batch: the pods' commands -----------------------------------------------------

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", envvar="TIDAL_MODEL_URI",
        help="file:///path, pvc://claim/path, hf://org/name (local cache), or 'smollm2'.",
    ),
]  # fmt: skip
NameOpt = Annotated[
    str,
    typer.Option(
        "--served-model-name", envvar="TIDAL_MODEL_NAME",
        help="The model name clients send (default: the --model value).",
    ),
]  # fmt: skip
TpOpt = Annotated[
    int, typer.Option("--tp", envvar="TIDAL_TENSOR_PARALLEL", min=1, help="Tensor-parallel ranks.")
]
DtypeOpt = Annotated[str, typer.Option(envvar="TIDAL_DTYPE", help="float32, bfloat16 or float16.")]
AttentionOpt = Annotated[
    str, typer.Option(envvar="TIDAL_ATTENTION", help="sdpa, fp16 (= sdpa) or int8.")
]
MaxLenOpt = Annotated[
    int | None, typer.Option(min=1, help="Longest prompt + output (default: the model's).")
]
KvOpt = Annotated[
    str | None,
    typer.Option(
        envvar="TIDAL_KV_CACHE_MEMORY",
        help="KV cache size, e.g. 2GiB (default: 1GiB on CPU; on a GPU 85% of its memory "
        "less what is in use after loading).",
    ),
]
SeqsOpt = Annotated[int, typer.Option(min=1, help="Most sequences in one batch.")]
TokensOpt = Annotated[int, typer.Option(min=1, help="Token budget of one engine step.")]
BlockOpt = Annotated[int, typer.Option(min=1, help="KV cache block size in tokens.")]
PrefixOpt = Annotated[bool, typer.Option(help="Share the KV blocks of common prompt prefixes.")]


def _engine_options(
    model: str, tp: int, dtype: str, attention: str, max_model_len: int | None,
    kv_cache_memory: str | None, max_num_seqs: int, max_num_batched_tokens: int,
    block_size: int, prefix_caching: bool,
) -> Any:  # fmt: skip
    from tidal.inference_worker.engine.build import EngineOptions  # noqa: PLC0415
    from tidal.inference_worker.settings import (  # noqa: PLC0415
        SettingsError,
        attention_backend,
        dtype_name,
        parse_bytes,
    )

    try:
        return EngineOptions(
            model_uri=str(_bundled()) if model == "smollm2" else model,
            dtype=dtype_name(dtype, "--dtype / TIDAL_DTYPE"),
            attention=attention_backend(attention, "--attention / TIDAL_ATTENTION"),
            tensor_parallel=tp,
            max_model_len=max_model_len,
            kv_cache_bytes=None
            if kv_cache_memory is None
            else parse_bytes(kv_cache_memory, "--kv-cache-memory / TIDAL_KV_CACHE_MEMORY"),
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_batched_tokens=max_num_batched_tokens,
            prefix_cache=prefix_caching,
            iso_min_tokens=int(os.environ.get("TIDAL_ISO_MIN_TOKENS", "256")),
        )
    except SettingsError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error


def _die(reason: str) -> None:
    """A rank or the engine loop died: say why and exit non-zero at once (a serving pod
    restarts; a batch worker's attempt fails and the operator retries it)."""
    import logging  # noqa: PLC0415

    logging.getLogger("tidal.worker").critical("the worker cannot go on: %s; exiting 1", reason)
    sys.stderr.flush()
    os._exit(1)


def _load(options: Any, name: str, metrics: Any) -> tuple[Any, Any]:
    """Load the model on every rank; an :class:`AsyncEngine` over rank 0's engine."""
    import torch  # noqa: PLC0415

    from tidal.inference_worker.engine import ranks  # noqa: PLC0415
    from tidal.inference_worker.engine.engine import AsyncEngine  # noqa: PLC0415

    engine, followers = ranks.start(options, metrics, cuda=torch.cuda.is_available())
    client = AsyncEngine(name, engine.config.max_model_len, engine.tokenizer)
    client.on_death = lambda error: _die(f"the engine loop failed: {error}")
    followers.watch(_die)
    client.attach(engine)
    return client, followers


@app.command("serve")
def serve_command(
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    model: ModelOpt = "smollm2",
    served_model_name: NameOpt = "",
    tp: TpOpt = 1,
    dtype: DtypeOpt = "float32",
    attention: AttentionOpt = "sdpa",
    max_model_len: MaxLenOpt = None,
    kv_cache_memory: KvOpt = None,
    max_num_seqs: SeqsOpt = 64,
    max_num_batched_tokens: TokensOpt = 512,
    block_size: BlockOpt = 16,
    prefix_caching: PrefixOpt = True,
    grace_period: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar="TIDAL_GRACE_SECONDS",
            help="Seconds to drain after SIGTERM (the pod's grace period).",
        ),
    ] = 30.0,
) -> None:
    """Serve the OpenAI-compatible API (an LLMService replica): /v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics."""
    from tidal.inference_worker.metrics import WorkerMetrics  # noqa: PLC0415
    from tidal.inference_worker.server.app import serve  # noqa: PLC0415

    options = _engine_options(
        model, tp, dtype, attention, max_model_len, kv_cache_memory, max_num_seqs,
        max_num_batched_tokens, block_size, prefix_caching,
    )  # fmt: skip
    name = served_model_name or model
    metrics = WorkerMetrics(name)
    loaded: list[Any] = []

    def build() -> Any:
        client, followers = _load(options, name, metrics)
        loaded.append(followers)
        return client

    def close(client: Any) -> None:
        client.shutdown()
        for followers in loaded:
            followers.stop()

    raise typer.Exit(serve(build, metrics, host, port, grace_period, close_engine=close))


@app.command("batch")
def batch_command(
    model: ModelOpt = "smollm2",
    served_model_name: NameOpt = "",
    tp: TpOpt = 1,
    dtype: DtypeOpt = "float32",
    attention: AttentionOpt = "sdpa",
    max_model_len: MaxLenOpt = None,
    kv_cache_memory: KvOpt = None,
    max_num_seqs: SeqsOpt = 64,
    max_num_batched_tokens: TokensOpt = 512,
    block_size: BlockOpt = 16,
    prefix_caching: PrefixOpt = True,
    concurrency: Annotated[int, typer.Option(min=1, help="Records in flight.")] = 32,
) -> None:
    """Run one shard of an LLMBatchJob (OpenAI Batch JSONL in and out; TIDAL_INPUT_URI,
    TIDAL_OUTPUT_URI, TIDAL_SHARD, TIDAL_CHECKPOINT_INTERVAL_SECONDS, TIDAL_RESUME_FROM,
    TIDAL_ATTEMPT). Exit 0 when the shard is complete, 143 after a SIGTERM checkpoint."""
    import logging  # noqa: PLC0415

    from tidal.inference_worker.batch import runner  # noqa: PLC0415
    from tidal.inference_worker.metrics import WorkerMetrics  # noqa: PLC0415
    from tidal.inference_worker.server.serving import complete  # noqa: PLC0415

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        runner.BatchSettings.from_env(os.environ)  # refuse bad settings before loading a model
    except ValueError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(runner.EXIT_CONFIG) from error
    options = _engine_options(
        model, tp, dtype, attention, max_model_len, kv_cache_memory, max_num_seqs,
        max_num_batched_tokens, block_size, prefix_caching,
    )  # fmt: skip
    name = served_model_name or model
    metrics = WorkerMetrics(name)
    client, followers = _load(options, name, metrics)
    kinds = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}

    async def respond(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return await complete(client, kinds[url], body)  # type: ignore[arg-type]

    try:
        code = runner.main(respond, metrics=metrics, concurrency=concurrency)
    finally:
        client.shutdown()
        followers.stop()
    raise typer.Exit(code)


def _bundled() -> Any:
    from tidal.inference_worker.weights.resolve import smollm2_gguf  # noqa: PLC0415

    try:
        return smollm2_gguf()
    except Exception as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

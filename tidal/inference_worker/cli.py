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

app = typer.Typer(help="The inference worker (model, tensor parallelism, ISO prefill).")

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
    from tidal.inference_worker.generate import Sampling, generate  # noqa: PLC0415
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
    sampling = Sampling(job.max_tokens, job.temperature, job.top_p, job.top_k, job.seed)
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


def _bundled() -> Any:
    from tidal.inference_worker.weights.resolve import smollm2_gguf  # noqa: PLC0415

    try:
        return smollm2_gguf()
    except Exception as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

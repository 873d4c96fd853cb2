"""INT8 FlashAttention on CPU through Triton's interpreter: accuracy against float64 attention
on the unquantized inputs, masks, GQA, odd lengths, poisoned outputs, errors, launch choices.

Targets (D=64, as docs/architecture.md states them): relative L2 fp16-P <= 1e-2,
int8_rowblock <= 2e-2 and flat in N, int8_static <= 3.5e-2, causal within 2x of non-causal.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors
if os.environ.get("TIDAL_KERNELS") != "require":
    pytest.importorskip("triton")

import torch

from tidal.inference_worker.kernels import (
    KernelError,
    LaunchConfig,
    choose_launch,
    cosine_similarity,
    int8_attention,
    quantize_per_token,
    quantize_v_per_channel,
    reference_attention,
    relative_l2,
    triton_fp8_attention,
    triton_fp16_attention,
)
from tidal.inference_worker.kernels import attention as attention_module
from tidal.inference_worker.kernels.launch import autotune_space
from tidal.inference_worker.kernels.reference import make_inputs

TARGET = {"fp16": 1e-2, "int8_rowblock": 2e-2, "int8_static": 3.5e-2}


def error(
    kind: str, n: int, d: int, causal: bool, mode: str, smooth_k: bool = True
) -> tuple[float, float]:
    q, k, v = make_inputs(kind, n, d)
    reference = reference_attention(q, k, v, causal, d**-0.5)
    poisoned = torch.full(q.shape, float("nan"), dtype=torch.float16)  # every row must be written
    out = int8_attention(
        q.half(), k.half(), v.half(), causal=causal, p_mode=mode, smooth_k=smooth_k, out=poisoned
    )
    assert isinstance(out, torch.Tensor)
    assert not out.isnan().any(), f"{kind} N={n} D={d} {mode}: rows left unwritten"
    return relative_l2(out, reference), cosine_similarity(out, reference)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [130, 257])
def test_accuracy_targets_randn(n: int, d: int) -> None:
    for mode, target in TARGET.items():
        plain, cos = error("randn", n, d, False, mode)
        causal, _ = error("randn", n, d, True, mode)
        assert plain <= target, f"{mode} N={n} D={d}: {plain:.4f} > {target}"
        assert cos >= 0.999
        assert causal <= 2 * plain, f"{mode} causal {causal:.4f} vs {plain:.4f}"


def test_rowblock_is_flat_in_n_where_the_static_scale_degrades() -> None:
    short = {m: error("randn", 130, 64, False, m)[0] for m in ("int8_rowblock", "int8_static")}
    long = {m: error("randn", 1024, 64, False, m)[0] for m in ("int8_rowblock", "int8_static")}
    assert long["int8_rowblock"] <= 1.2 * short["int8_rowblock"] <= 2e-2 * 1.2
    assert long["int8_static"] >= 1.2 * short["int8_static"]  # 1/127 loses small P values
    assert long["int8_static"] <= TARGET["int8_static"]
    assert long["int8_rowblock"] < long["int8_static"]


@pytest.mark.parametrize("kind", ["uniform", "biased"])
def test_accuracy_targets_other_inputs(kind: str) -> None:
    for mode in ("int8_rowblock", "fp16"):
        err, _ = error(kind, 257, 64, False, mode)
        assert err <= TARGET[mode], f"{kind} {mode}: {err:.4f}"


def test_peaky_logits_error_comes_from_qk_not_from_p() -> None:
    # Scores with std ~3 put ~0.4 of the mass on one key; INT8 QK alone (fp16 P) then costs
    # ~1.6e-2, above the randn targets, and quantizing P adds little on top.
    fp16_p, _ = error("peaky", 257, 64, False, "fp16")
    rowblock, _ = error("peaky", 257, 64, False, "int8_rowblock")
    assert rowblock <= 1.3 * fp16_p
    assert rowblock <= 2.5e-2


def test_k_smoothing_is_what_makes_outlier_channels_accurate() -> None:
    smoothed, _ = error("biased", 257, 64, False, "int8_rowblock", smooth_k=True)
    raw, _ = error("biased", 257, 64, False, "int8_rowblock", smooth_k=False)
    assert smoothed <= 2e-2
    assert raw >= 2 * smoothed


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention(causal: bool) -> None:
    q, k, v = make_inputs("randn", 200, 64, q_heads=8, kv_heads=2)
    reference = reference_attention(q, k, v, causal, 0.125)
    out = int8_attention(q.half(), k.half(), v.half(), causal=causal)
    assert isinstance(out, torch.Tensor)
    assert out.shape == q.shape
    assert relative_l2(out, reference) <= 2e-2
    # every query head reads its own KV head: a wrong mapping would be far off
    per_head = [relative_l2(out[:, h], reference[:, h]) for h in range(8)]
    assert max(per_head) <= 3e-2


def test_poisoned_output_is_fully_overwritten_and_lse_is_right() -> None:
    q, k, v = make_inputs("biased", 131, 128)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16)
    o, lse = int8_attention(q.half(), k.half(), v.half(), causal=True, out=out, return_lse=True)
    assert o.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    scores = (q.double() @ k.double().transpose(-1, -2)) * 128**-0.5
    scores = scores.masked_fill(~torch.ones(131, 131, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    assert torch.allclose(lse.double(), expected, atol=0.05, rtol=0)  # smoothing corrected


def test_output_dtypes_follow_the_inputs() -> None:
    q, k, v = make_inputs("randn", 64, 64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = int8_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert isinstance(out, torch.Tensor)
        assert out.dtype == dtype
        assert relative_l2(out, reference_attention(q, k, v, False, 0.125)) <= 2e-2


def test_triton_fp16_baseline_is_exact_to_fp16() -> None:
    q, k, v = make_inputs("randn", 130, 64)
    for causal in (False, True):
        out = triton_fp16_attention(q.half(), k.half(), v.half(), causal=causal)
        assert relative_l2(out, reference_attention(q, k, v, causal, 0.125)) <= 1e-3


def test_fp8_paths_run_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8 P mode and the FP8 baseline need sm_89+ on a GPU; here the interpreter runs them
    as if on Hopper. Its float32 -> e4m3 cast drops the carry when rounding crosses a power of
    two (-1.985 becomes -1.0, not -2.0), so the error seen here (~6e-2) is above what e4m3 P
    and V really cost (~3.4e-2 in a float64 emulation); the bound is loose on purpose and the
    GPU benchmark measures the real error. What this catches: kernels that do not compile or
    run (an integer `other=` for fp8 loads did), unwritten rows, wrong scales or head mapping."""
    monkeypatch.setattr(attention_module, "_capability", lambda _: (9, 0))
    q, k, v = make_inputs("randn", 130, 64, q_heads=4, kv_heads=2)
    for causal in (False, True):
        reference = reference_attention(q, k, v, causal, 0.125)
        poisoned = torch.full(q.shape, float("nan"), dtype=torch.float16)
        ours = int8_attention(q.half(), k.half(), v.half(), causal=causal, p_mode="fp8",
                              out=poisoned)  # fmt: skip
        baseline = triton_fp8_attention(q.half(), k.half(), v.half(), causal=causal)
        for name, out in (("fp8 P", ours), ("fp8 baseline", baseline)):
            assert isinstance(out, torch.Tensor) and not out.isnan().any(), name
            assert relative_l2(out, reference) <= 0.1, name
            assert cosine_similarity(out, reference) >= 0.995, name
            per_head = [relative_l2(out[:, h], reference[:, h]) for h in range(4)]
            assert max(per_head) <= 0.12, name


def test_quantization_kernels_round_trip() -> None:
    x = torch.randn(1, 2, 77, 64) * torch.linspace(0.1, 10, 64)
    q8, scale = quantize_per_token(x)
    assert q8.dtype == torch.int8 and scale.shape == (1, 2, 77)
    assert q8.abs().amax(dim=-1).min() == 127  # each row uses the full range
    restored = q8.float() * scale[..., None]
    assert (restored - x).abs().le(scale[..., None] / 2 + 1e-6).all()
    mean = x.mean(dim=2, keepdim=True)
    centred, centred_scale = quantize_per_token(x, mean=mean)
    assert ((centred.float() * centred_scale[..., None]) - (x - mean)).abs().max() <= (
        centred_scale.max() / 2 + 1e-6
    )
    vt, v_scale = quantize_v_per_channel(x)
    assert vt.shape == (1, 2, 64, 77) and vt.is_contiguous()
    back = vt.transpose(-1, -2).float() * v_scale[:, :, None, :]
    assert (back - x).abs().le(v_scale[:, :, None, :] / 2 + 1e-6).all()


@pytest.mark.parametrize(
    ("n_q", "n_k"),
    [(66, 130), (64, 128), (1, 97), (130, 130), (33, 200)],  # offsets 64, 64, 96, 0, 167
)
def test_causal_attention_with_a_query_offset(n_q: int, n_k: int) -> None:
    """Queries that start among the keys (a KV cache): row i sees keys [0, i + n_k - n_q]."""
    q_all, k, v = make_inputs("randn", n_k, 64, q_heads=4, kv_heads=2, seed=n_q)
    offset = n_k - n_q
    q = q_all[:, :, offset:]
    reference = reference_attention(q, k, v, True, 64**-0.5, q_offset=offset)
    full = reference_attention(q_all, k, v, True, 64**-0.5)[:, :, offset:]
    assert torch.allclose(reference, full)  # the offset reference is the tail of a full prefill
    for mode in ("fp16", "int8_rowblock"):
        poisoned = torch.full(q.shape, float("nan"), dtype=torch.float16)
        out = int8_attention(
            q.half(), k.half(), v.half(), causal=True, q_offset=offset, p_mode=mode, out=poisoned
        )
        assert isinstance(out, torch.Tensor) and not out.isnan().any()
        assert relative_l2(out, reference) <= TARGET[mode], (mode, n_q, n_k)
    baseline = triton_fp16_attention(q.half(), k.half(), v.half(), causal=True, q_offset=offset)
    assert relative_l2(baseline, reference) <= 1e-3


def test_a_query_offset_outside_the_keys_is_refused() -> None:
    q, k, v = (t.half() for t in make_inputs("randn", 64, 64))
    with pytest.raises(KernelError, match=r"q_offset 1: queries 1\.\.64 must lie among"):
        int8_attention(q, k, v, causal=True, q_offset=1)
    with pytest.raises(KernelError, match="causal attention only"):
        int8_attention(q[:, :, :8], k, v, q_offset=8)


def test_bad_inputs_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (t.half() for t in make_inputs("randn", 32, 64))
    cases = [
        ((q[..., :32], k[..., :32], v[..., :32]), {}, "head_dim 32 is not supported"),
        ((q.int(), k, v), {}, "q: dtype torch.int32"),
        ((q[0], k, v), {}, "q: expected (batch, heads, seq, head_dim)"),
        ((q, k[:, :1], v), {}, "must have one shape"),
        ((q[:, :1].expand(1, 3, 32, 64), k, v), {}, "3 query heads are not a multiple of 2"),
        ((q, k, v), {"p_mode": "int4"}, "p_mode 'int4' is not one of"),
        ((q, k, v), {"p_mode": "fp8"}, "needs an NVIDIA GPU with compute capability >= 8.9"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(KernelError, match=message.replace("(", r"\(").replace(")", r"\)")):
            int8_attention(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        int8_attention(q, k, v)


def test_launch_choices() -> None:
    assert choose_launch(64, 4096, 4096, "int8_rowblock", None) == LaunchConfig(64, 64, 4, 1)
    hopper = choose_launch(128, 8192, 8192, "int8_rowblock", (9, 0))
    assert (hopper.block_m, hopper.block_n, hopper.num_warps) == (128, 128, 8)
    assert choose_launch(128, 8192, 8192, "fp16", (9, 0)).block_n == 64  # fp16 tiles are bigger
    assert choose_launch(64, 256, 256, "int8_rowblock", (9, 0)).block_m == 64  # fill the SMs
    assert choose_launch(128, 8192, 8192, "int8_rowblock", (8, 0)).num_stages == 2
    with pytest.raises(ValueError, match="head_dim 96"):
        choose_launch(96, 1, 1, "fp16", None)
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(48, 64, 4, 2)
    space = autotune_space(128)
    assert LaunchConfig(128, 128, 8, 3) in space and LaunchConfig(128, 128, 8, 4) not in space


def test_explicit_launch_config_gives_the_same_answer() -> None:
    q, k, v = (t.half() for t in make_inputs("randn", 100, 64))
    a = int8_attention(q, k, v, causal=True, config=LaunchConfig(32, 16, 4, 1))
    b = int8_attention(q, k, v, causal=True, config=LaunchConfig(64, 64, 4, 1))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    assert relative_l2(a, b) <= 2e-2  # different P blocks quantize differently, both accurate


def test_benchmark_script_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    """The GPU benchmark is kept runnable: its smoke mode times every method on CPU."""
    path = Path(__file__).parents[1] / "bench" / "attention_bench.py"
    spec = importlib.util.spec_from_file_location("attention_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["attention_bench"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = (out / "attention.md").read_text()
    assert '"chained int8 dot (triton #3580)": "ok"' in text
    for method in ("triton-fp16", "ours-int8_rowblock kernel", "ours-int8_static +quant"):
        assert f"| {method} |" in text


def test_accuracy_script_prints_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/kernel_accuracy.py makes the accuracy table of bench/RESULTS.md."""
    path = Path(__file__).parents[1] / "bench" / "kernel_accuracy.py"
    spec = importlib.util.spec_from_file_location("kernel_accuracy", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--kinds", "randn", "--n", "70"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split("|")
    cells = [c.strip() for c in row[3:-1]]
    assert row[1].strip() == "randn" and len(cells) == 6
    assert all(float(c) < 3e-2 for c in cells[:3]) and cells[3:5] == ["-", "-"]  # no fp8 on CPU
    assert 1e-2 < float(cells[5]) < 6e-2  # e4m3 P and V, emulated in PyTorch

"""Attention kernels in Triton: INT8 FlashAttention forward (P modes int8_rowblock, int8_static,
fp16, fp8), its quantization kernels, a float64 reference and a Triton FP16 baseline.

torch and triton are imported here; the rest of tidal does not need them.
"""

from tidal.inference_worker.kernels.attention import (
    KernelError,
    Quantized,
    attention_quantized,
    int8_attention,
    quantize_inputs,
    tops,
    triton_fp8_attention,
    triton_fp16_attention,
)
from tidal.inference_worker.kernels.launch import P_MODES, LaunchConfig, choose_launch
from tidal.inference_worker.kernels.quant import quantize_per_token, quantize_v_per_channel
from tidal.inference_worker.kernels.reference import (
    cosine_similarity,
    reference_attention,
    relative_l2,
)

__all__ = [
    "P_MODES",
    "KernelError",
    "LaunchConfig",
    "Quantized",
    "attention_quantized",
    "choose_launch",
    "cosine_similarity",
    "int8_attention",
    "quantize_inputs",
    "quantize_per_token",
    "quantize_v_per_channel",
    "reference_attention",
    "relative_l2",
    "tops",
    "triton_fp8_attention",
    "triton_fp16_attention",
]

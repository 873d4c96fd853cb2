"""Launch parameters for the attention kernels: a pure function of the problem and the device,
so the choice is testable without a GPU and the benchmark can sweep the same small set."""

from __future__ import annotations

from dataclasses import dataclass

P_MODES = ("int8_rowblock", "int8_static", "fp16", "fp8")
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")


def choose_launch(
    head_dim: int,
    seq_q: int,
    seq_k: int,
    p_mode: str,
    capability: tuple[int, int] | None,
) -> LaunchConfig:
    """The default launch for one problem. ``capability`` is the GPU's (major, minor), None on
    Triton's CPU interpreter (where bigger blocks mean fewer interpreted steps).

    Hopper (9.x) runs 128-row query blocks with 8 warps for D=128 (two warpgroups share the
    Q tile) and 4 for D=64, and deeper pipelines where shared memory allows (8-bit tiles are half
    the size of fp16 ones). Short sequences get smaller query blocks so enough programs exist to
    fill the SMs."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; use one of {HEAD_DIMS}")
    if p_mode not in P_MODES:
        raise ValueError(f"p_mode {p_mode!r} is not one of {', '.join(P_MODES)}")
    if capability is None:
        return LaunchConfig(64, 64, 4, 1)
    eight_bit_pv = p_mode != "fp16"
    block_m = 128 if seq_q >= 1024 else 64
    if capability[0] >= 9:
        block_n = 128 if head_dim == 64 or eight_bit_pv else 64
        warps = 8 if head_dim == 128 and block_m == 128 else 4
        stages = 3 if head_dim == 128 else 4
    else:  # Ampere/Ada: less shared memory per SM
        block_n = 64
        warps = 4
        stages = 2 if head_dim == 128 else 3
    return LaunchConfig(block_m, block_n, warps, stages)


def autotune_space(head_dim: int) -> list[LaunchConfig]:
    """The small set the GPU benchmark tries on Hopper before timing."""
    out = []
    for block_m in (64, 128):
        for block_n in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if head_dim == 128 and block_n == 128 and stages == 4:
                        continue  # over the shared-memory budget with 8-bit + fp32 tiles
                    out.append(LaunchConfig(block_m, block_n, warps, stages))
    return out

"""The stated model behind the simulator's served online load: a tensor-parallel replica's
relative throughput at each achieved tier, from the worker's own per-layer cost model
(:mod:`tidal.inference_worker.iso_split`), not from round numbers. ``tidal simulate`` and
``tidal evaluate`` use :data:`DERIVED_TIER_THROUGHPUT` unless a scenario states its own
``tier_throughput``."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.inference_worker.iso_split import OpCosts, choose_split, serial_time


@dataclass(frozen=True)
class ThroughputModel:
    """A tensor-parallel replica's relative throughput by achieved tier, derived from the
    worker's per-layer cost model (:mod:`tidal.inference_worker.iso_split`): one decoder layer
    costs attention + MLP + two all-reduces, an all-reduce ``latency + 2(n-1)/n · T · h · 2
    bytes / bandwidth`` (ring, BF16 activations of T tokens). Compute is the layer's matmul
    FLOPs split over the ranks at ``peak_flops x efficiency`` per second (:attr:`flops`). The
    factor of a tier is the NVLink step time over the tier's (``iso``: with the worker's ISO
    split, which hides part of the all-reduce behind the other chunk's compute, as its engine
    does for long prompts).

    Defaults: a Llama-2-70B-shaped model (hidden 8192, MLP 28672, 80 layers, 8 KV heads of
    128) at TP 4 on A100-class GPUs (312 TFLOP/s BF16 peak at 50%), a step of 512 tokens (the
    engine's ``max_batched_tokens``). Bandwidths per direction are those of
    :attr:`tidal.topology.Link.weight`: NVLink NV12 (the HGX A100's NVSwitch) 300 GB/s, a PCIe
    switch (PIX) 24, a NUMA node's worst pair (NODE, across host bridges) 10, across NUMA
    nodes or sockets (SYS) 6; latency 10 µs per all-reduce over NVLink, 25 µs over PCIe."""

    hidden: int = 8192
    intermediate: int = 28672
    layers: int = 80
    kv_dim: int = 8 * 128
    tp: int = 4
    peak_flops: float = 312e12  # A100 BF16 dense
    efficiency: float = 0.5  # of the peak the layer's matmuls reach
    tokens: int = 512
    iso: bool = False
    bandwidth: tuple[tuple[str, float], ...] = (
        ("nvlink", 300e9),
        ("pcie-switch", 24e9),
        ("numa", 10e9),
        ("socket", 6e9),
        ("node", 6e9),
    )
    latency: tuple[tuple[str, float], ...] = (
        ("nvlink", 10e-6),
        ("pcie-switch", 25e-6),
        ("numa", 25e-6),
        ("socket", 25e-6),
        ("node", 25e-6),
    )

    @property
    def flops(self) -> float:
        """Effective matmul FLOP/s per GPU."""
        return self.peak_flops * self.efficiency

    def costs(self, tier: str) -> OpCosts:
        h, tp = self.hidden, self.tp
        attention = 2 * h * h + 2 * h * self.kv_dim  # q, o; k, v (grouped-query)
        mlp = 3 * h * self.intermediate
        return OpCosts(
            a_token=2 * attention / tp / self.flops,
            a_pair=4 * h / tp / self.flops,  # QK^T and PV per query-key pair
            f_token=2 * mlp / tp / self.flops,
            r_fixed=dict(self.latency)[tier],
            r_token=2 * (tp - 1) / tp * h * 2 / dict(self.bandwidth)[tier],
        )

    def step_s(self, tier: str) -> float:
        costs = self.costs(tier)
        if self.iso:
            choice = choose_split(costs, self.tokens, self.layers)
            return min(choice.iso_s, choice.serial_s)
        return serial_time(costs, self.tokens, self.layers)

    def factors(self) -> dict[str, float]:
        """Relative throughput per tier label, NVLink 1.0, rounded to 3 digits."""
        base = self.step_s("nvlink")
        return {tier: round(base / self.step_s(tier), 3) for tier, _ in self.bandwidth}


DERIVED_TIER_THROUGHPUT = ThroughputModel().factors()

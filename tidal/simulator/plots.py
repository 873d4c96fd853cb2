"""Figures of a simulation result (matplotlib, headless): one PNG per scenario with the six
panels a reader compares policies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes

COLORS = {
    "tidal": "#1f77b4",
    "b0-default": "#d62728",
    "b1-anchor": "#ff7f0e",
    "b2-subsets": "#2ca02c",
}


def write_overview(result: dict[str, Any], path: Path) -> Path:
    """Allocation, online demand vs served, preemptions and wasted GPUs, lost work over the
    day; affinity hits and decision latency per policy."""
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5), layout="constrained")
    policies = result["policies"]
    _over_time(axes[0, 0], policies, "allocation", "GPU allocation", percent=True)
    _online(axes[0, 1], policies)
    _preemptions(axes[0, 2], policies)
    _over_time(axes[1, 0], policies, "lost_gpu_hours", "lost work (GPU-hours, cumulative)")
    _affinity(axes[1, 1], policies)
    _latency(axes[1, 2], policies)
    figure.suptitle(
        f"{result['scenario']}: {result['nodes']} nodes, {result['gpus']} GPUs, "
        f"{result['batch_jobs']} batch jobs"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _name(policy: dict[str, Any]) -> str:
    return str(policy["summary"]["policy"])


def _hours(policy: dict[str, Any]) -> list[float]:
    return [s["t_h"] for s in policy["series"]]


def _over_time(
    ax: Axes, policies: list[dict[str, Any]], key: str, title: str, percent: bool = False
) -> None:
    for policy in policies:
        values = [s[key] * (100 if percent else 1) for s in policy["series"]]
        ax.plot(_hours(policy), values, label=_name(policy), color=COLORS.get(_name(policy)))
    ax.set_title(title + (" (%)" if percent else ""))
    ax.set_xlabel("hour of the day")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _online(ax: Axes, policies: list[dict[str, Any]]) -> None:
    first = policies[0]
    demand = [s["online_demand"] for s in first["series"]]
    ax.fill_between(_hours(first), demand, color="0.85", label="demand (replicas)")
    for policy in policies:
        served = [s["online_served"] for s in policy["series"]]
        ax.plot(_hours(policy), served, label=_name(policy), color=COLORS.get(_name(policy)))
    ax.set_title("online demand vs served (replica-equivalents)")
    ax.set_xlabel("hour of the day")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _preemptions(ax: Axes, policies: list[dict[str, Any]]) -> None:
    for policy in policies:
        color = COLORS.get(_name(policy))
        hours = _hours(policy)
        ax.plot(
            hours, [s["preemptions"] for s in policy["series"]], color=color, label=_name(policy)
        )
        ax.plot(hours, [s["wasted_gpus"] for s in policy["series"]], color=color, linestyle=":")
    ax.set_title("preemptions (solid) and wasted GPUs (dotted), cumulative")
    ax.set_xlabel("hour of the day")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _bars(ax: Axes, policies: list[dict[str, Any]], keys: dict[str, str], scale: float) -> None:
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        values = [(policy["summary"][k] or 0.0) * scale for k in keys]
        positions = [j + i * width for j in range(len(keys))]
        ax.bar(positions, values, width, label=_name(policy), color=COLORS.get(_name(policy)))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], list(keys.values()))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _affinity(ax: Axes, policies: list[dict[str, Any]]) -> None:
    keys = {
        "M1_affinity_hit_guaranteed": "preemptors\nguaranteed",
        "M1_affinity_hit_best_effort": "preemptors\nbest-effort",
        "M1_online_aligned_guaranteed": "all online\nguaranteed",
        "M1_online_aligned_best_effort": "all online\nbest-effort",
    }
    _bars(ax, policies, keys, 100)
    ax.set_title("placements aligned at the requested tier (%)")
    ax.set_ylim(0, 105)


def _latency(ax: Axes, policies: list[dict[str, Any]]) -> None:
    keys = {
        "M11_place_p50_ms": "place p50",
        "M11_place_p99_ms": "place p99",
        "M11_preempt_p50_ms": "preempt p50",
        "M11_preempt_p99_ms": "preempt p99",
    }
    _bars(ax, policies, keys, 1)
    ax.set_yscale("log")
    ax.set_title("decision latency in the simulator (ms, log)")

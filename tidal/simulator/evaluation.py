"""The evaluation report: the bundled scenarios replayed with every policy, the seed paper's
claim tested, a sweep of the throughput model, and the optimality gap (M12), written as
Markdown with figures by one command (``tidal evaluate``).

Every sentence that compares policies is computed from the numbers it sits next to, so a
regenerated report cannot claim a win the data does not show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tidal.simulator.metrics import served_load
from tidal.simulator.optimality import optimality_gap
from tidal.simulator.plots import write_overview
from tidal.simulator.run import simulate
from tidal.simulator.scenario import load_scenario
from tidal.simulator.throughput import DERIVED_TIER_THROUGHPUT, ThroughputModel

SCENARIOS = ("openb-day", "topology-rich", "nvswitch-control")
OURS, B0, B2 = "tidal", "b0-default", "b2-subsets"
DEFAULT_SEEDS = (7,)

_MODEL = ThroughputModel()
_HALF_PCIE = tuple((tier, bw if tier == "nvlink" else bw / 2) for tier, bw in _MODEL.bandwidth)

# Relative throughput of a tensor-parallel replica by achieved tier, each derived from the
# worker's cost model (throughput.ThroughputModel): the default (a serial step of 512 tokens), the
# same with the worker's ISO overlap on 2,048-token prompts (milder), and with PCIe at half
# bandwidth (steeper: two GPUs sharing a switch's uplink). The report shows how conclusions
# move with the model.
THROUGHPUT_MODELS: dict[str, dict[str, float]] = {
    "iso-2048": dataclasses.replace(_MODEL, iso=True, tokens=2048).factors(),
    "default": dict(DERIVED_TIER_THROUGHPUT),
    "half-pcie": dataclasses.replace(_MODEL, bandwidth=_HALF_PCIE).factors(),
}

# The targets, per scenario and seed: ours at least as good as the best baseline.
TARGETS_HIGHER = (
    "M7_online_served_fraction",
    "M8_goodput_gpu_hours",
    "M8_work_done_gpu_hours",
    "M9_mean_allocation",
)
TARGETS_LOWER = ("M5_lost_gpu_hours",)

# Summary metrics compared in "where ours does not win", with the better direction.
HIGHER_IS_BETTER = (
    "M1_affinity_hit_guaranteed",
    "M1_affinity_hit_best_effort",
    "M2_preemption_success",
    "M7_online_served_fraction",
    "M7_online_bound_fraction",
    "M8_goodput_gpu_hours",
    "M8_work_done_gpu_hours",
    "M9_mean_allocation",
)
LOWER_IS_BETTER = (
    "M3_wasted_gpus",
    "M4_victim_pods_per_preemption",
    "M5_lost_gpu_hours",
    "M8_cascades",
    "M11_preempt_p99_ms",
)
TABLE_METRICS = (
    "M1_affinity_hit_guaranteed",
    "M1_affinity_hit_best_effort",
    "M2_preemption_success",
    "M7_online_served_fraction",
    "M7_online_bound_fraction",
    "M3_wasted_gpus",
    "M4_victim_pods_per_preemption",
    "M5_lost_gpu_hours",
    "M8_cascades",
    "M8_goodput_gpu_hours",
    "M8_work_done_gpu_hours",
    "M8_batch_gpu_hours",
    "M9_mean_allocation",
    "M8_jobs_completed",
    "M10_double_allocations",
    "M10_priority_inversions",
    "M11_place_p99_ms",
    "M11_preempt_p50_ms",
    "M11_preempt_p99_ms",
    "preemptions",
)

Progress = Callable[[str, str, float], None]


def evaluate(
    out: Path,
    quick: bool = False,
    on_progress: Progress | None = None,
    command: str = "",
    seeds: Sequence[int] = DEFAULT_SEEDS,
) -> Path:
    """Replay the bundled scenarios once per seed, write ``out/evaluation.md``, its figures (the
    first seed's) and a JSON of every summary under ``out/evaluation/``; returns the Markdown
    file's path. Scenarios weigh served load by their ``tier_throughput``, by default the
    derived :data:`tidal.simulator.throughput.DERIVED_TIER_THROUGHPUT`."""
    figures = out / "evaluation"
    figures.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    for name in SCENARIOS:
        base = load_scenario(Path(name))
        if quick:
            base = base.quick()
        for seed in seeds:
            label = name if len(seeds) == 1 else f"{name} (seed {seed})"

            def progress(policy: str, now: float, scenario_name: str = label) -> None:
                if on_progress:
                    on_progress(scenario_name, policy, now)

            result = simulate(dataclasses.replace(base, seed=seed), progress)
            by_seed.setdefault(name, {})[seed] = _summaries(result)
            if name not in results:
                results[name] = result
                write_overview(result, figures / f"{name}.png")
    gaps = optimality_gap(instances=100 if quick else 400)
    summaries = {name: _summaries(result) for name, result in results.items()}
    sweep = {name: throughput_sweep(results[name]) for name in SCENARIOS}
    (figures / "results.json").write_text(
        json.dumps(
            {
                "summaries": summaries,
                "scenarios": {
                    name: {k: r[k] for k in ("nodes", "gpus", "batch_jobs")}
                    for name, r in results.items()
                },
                "seeds": list(seeds),
                "by_seed": {n: {str(k): v for k, v in s.items()} for n, s in by_seed.items()},
                "throughput_sweep": sweep,
                "throughput_models": THROUGHPUT_MODELS,
                "optimality": gaps,
            },
            indent=1,
        )
    )
    report = out / "evaluation.md"
    report.write_text(render(results, sweep, gaps, command, quick, by_seed))
    return report


def _summaries(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["summary"]["policy"]: p["summary"] for p in result["policies"]}


def throughput_sweep(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Served fraction of online demand per policy under each throughput model, re-weighed
    from the per-step placements by tier (no replay needed)."""
    out: dict[str, dict[str, float]] = {}
    for policy in result["policies"]:
        demand = sum(s["online_demand"] for s in policy["series"]) or 1.0
        out[policy["summary"]["policy"]] = {
            model: sum(served_load(s["placed_by_tier"], weights) for s in policy["series"]) / demand
            for model, weights in THROUGHPUT_MODELS.items()
        }
    return out


# -- Markdown --------------------------------------------------------------------------------


def render(
    results: dict[str, dict[str, Any]],
    sweep: dict[str, dict[str, dict[str, float]]],
    gaps: list[dict[str, Any]],
    command: str,
    quick: bool,
    by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]] | None = None,
) -> str:
    by_seed = by_seed or {name: {0: _summaries(result)} for name, result in results.items()}
    bound = [
        v["M7_online_bound_fraction"]
        for seeds in by_seed.values()
        for summaries in seeds.values()
        for v in summaries.values()
        if v.get("M7_online_bound_fraction") is not None
    ]
    lines = [
        "# Evaluation: topology-aware preemption on real traces",
        "",
        f"Generated by `{command or 'tidal evaluate'}`"
        + (" (quick: sampled clusters)" if quick else "")
        + f" on {platform.machine()} with {os.cpu_count()} cores, Python "
        + f"{platform.python_version()}. Do not edit by hand: rerun the command.",
        "",
        "Policies (docs/architecture.md, the scheduling model): **tidal** (ours: placement "
        "ranked by demand-weighted fragmentation (FGD-style, the demand learned from the pods "
        "it places), then bin packing, then intact tier domains; the exact "
        "topology-first planner), **b0-default** (Kubernetes default preemption, count-based, "
        "GPU ids first-free), **b1-anchor** (Koordinator-like: topology-aware feasibility in the "
        "reprieve loop), **b2-subsets** (the seed paper's victim-subset enumeration, capped at "
        "4 of 16 pods per node). Baselines bin-pack GPUs (NodeResourcesFit MostAllocated). Every "
        "policy replays the same event stream: openb batch jobs (BE/Burstable, whole GPUs) and "
        "online services whose replica targets follow the GenAI gateway's daily QPS shape.",
        "",
        "Served online load is a *model*. Every policy binds about the same online replicas "
        f"(M7_online_bound_fraction: {_pct(min(bound, default=None))} to "
        f"{_pct(max(bound, default=None))} of replica-steps demanded, over every scenario, seed "
        "and policy); what differs is the tier their GPUs achieve. M7_online_served_fraction "
        "weighs each bound tensor-parallel replica by its tier's relative throughput (single-GPU "
        "replicas serve fully), so where ours is higher it serves its replicas at "
        "better-aligned tiers; it does not bind more of them. The factors "
        + _model_text(THROUGHPUT_MODELS["default"])
        + " are derived, not measured: "
        + _MODEL_STATEMENT
        + " The sweep below shows how the comparison moves with that model.",
        "",
        "Batch: M8_goodput_gpu_hours counts only jobs finished by the horizon (a job still "
        "running at the end counts nothing); M8_work_done_gpu_hours is the GPU-hours batch pods "
        "held (M8_batch_gpu_hours) minus the work preemptions lost (M5), finished or not.",
        "",
        "## The seed paper's claim",
        "",
        "The paper reports topology-affinity hits of preemptor placements rising from 44.5% to "
        "100% and 55% better scheduled performance over the Kubernetes default. Here:",
        "",
        "| scenario | affinity hits, best-effort preemptors (B0 → ours) | guaranteed "
        "(B0 → ours) | all online replicas aligned, guaranteed (B0 → ours) | served online "
        "load (B0 → ours) | change |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        s = _summaries(result)
        ours, b0 = s[OURS], s[B0]
        served = _ratio(ours["M7_online_served_fraction"], b0["M7_online_served_fraction"])
        lines.append(
            f"| {name} | {_pct(b0['M1_affinity_hit_best_effort'])} → "
            f"{_pct(ours['M1_affinity_hit_best_effort'])} | "
            f"{_pct(b0['M1_affinity_hit_guaranteed'])} → {_pct(ours['M1_affinity_hit_guaranteed'])}"
            f" | {_pct(b0['M1_online_aligned_guaranteed'])} → "
            f"{_pct(ours['M1_online_aligned_guaranteed'])} | "
            f"{_pct(b0['M7_online_served_fraction'])} → {_pct(ours['M7_online_served_fraction'])}"
            f" | {served} |"
        )
    lines += ["", *_claim_reading(results), ""]
    seeds = sorted({seed for runs in by_seed.values() for seed in runs})
    first = next(iter(next(iter(by_seed.values()))), None)
    note = f" Seed {first} (the targets table below has every seed)." if len(seeds) > 1 else ""
    for name, result in results.items():
        lines += _scenario_section(name, result, note)
    lines += _targets_section(by_seed)
    lines += _over_seeds_section(by_seed)
    lines += _sweep_section(sweep)
    lines += _optimality_section(gaps)
    lines += _losses_section(by_seed)
    return "\n".join(lines) + "\n"


def _claim_reading(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, result in results.items():
        s = _summaries(result)
        ours, b0 = s[OURS], s[B0]
        gain = _gain(ours["M7_online_served_fraction"], b0["M7_online_served_fraction"])
        verdict = (
            "its replicas at better-aligned tiers than"
            if gain > 0.005
            else "its replicas at worse-aligned tiers than"
            if gain < -0.005
            else "its replicas at about the tiers of"
        )
        lost = _ratio(ours["M5_lost_gpu_hours"], b0["M5_lost_gpu_hours"])
        bound = (ours["M7_online_bound_fraction"], b0["M7_online_bound_fraction"])
        out.append(
            f"- **{name}**: ours serves {verdict} B0 (modelled served load {gain:+.1%}; "
            f"replicas bound {_pct(bound[0])} vs {_pct(bound[1])}), with "
            f"{ours['preemptions']} preemptions against {b0['preemptions']} and lost work "
            f"{ours['M5_lost_gpu_hours']:.1f} vs {b0['M5_lost_gpu_hours']:.1f} GPU-hours ({lost})."
        )
    best = max(
        _gain(
            _summaries(r)[OURS]["M7_online_served_fraction"],
            _summaries(r)[B0]["M7_online_served_fraction"],
        )
        for r in results.values()
    )
    reproduced = "reached" if best >= 0.55 else f"not reached (best here {best:+.1%})"
    out.append(
        f"- The paper's +55% in scheduled performance is {reproduced}: the gain in modelled "
        "served load comes only from the tiers replicas achieve, so it depends on the cluster's "
        "topology and on the throughput model (sweep below)."
    )
    return out


def _scenario_section(name: str, result: dict[str, Any], note: str = "") -> list[str]:
    s = _summaries(result)
    policies = list(s)
    lines = [
        f"## {name}",
        "",
        f"{result['nodes']} nodes, {result['gpus']} GPUs, {result['batch_jobs']} batch jobs "
        "over the day." + note,
        "",
        f"![{name}](evaluation/{name}.png)",
        "",
        "| metric | " + " | ".join(policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    for key in TABLE_METRICS:
        lines.append(f"| {key} | " + " | ".join(_cell(s[p][key]) for p in policies) + " |")
    return [*lines, ""]


def _sweep_section(sweep: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "## Sensitivity to the throughput model",
        "",
        "Served fraction of online demand, re-weighed from the same placements (first seed) "
        "under three derived models: *iso-2048* the same model with the worker's ISO split on "
        "2,048-token prompts (part of each all-reduce hidden behind the other chunk's compute) "
        + _model_text(THROUGHPUT_MODELS["iso-2048"])
        + "; *default* "
        + _model_text(THROUGHPUT_MODELS["default"])
        + "; *half-pcie* PCIe and SMP links at half bandwidth (two GPUs sharing a switch's "
        "uplink) " + _model_text(THROUGHPUT_MODELS["half-pcie"]) + ".",
        "",
        "| scenario | model | " + " | ".join(next(iter(sweep.values()))) + " | ours vs B0 |",
        "|---|---|" + "---|" * (len(next(iter(sweep.values()))) + 1),
    ]
    for name, by_policy in sweep.items():
        for model in THROUGHPUT_MODELS:
            cells = " | ".join(_pct(v[model]) for v in by_policy.values())
            gain = _gain(by_policy[OURS][model], by_policy[B0][model])
            lines.append(f"| {name} | {model} | {cells} | {gain:+.1%} |")
    return [*lines, ""]


def _optimality_section(gaps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## M12: optimality against brute force",
        "",
        f"{gaps[0]['instances']} random instances (2 busy nodes of real shapes, mixed "
        "priorities, PDBs, checkpoints; a preemptor of 1–8 GPUs with a random topology "
        "requirement) where a preemption is needed and possible. Brute force tries every "
        "victim subset and every GPU set; plans are compared on the full cost key.",
        "",
        "| policy | found a plan | optimal | more victims | more lost work | worse alignment |",
        "|---|---|---|---|---|---|",
    ]
    for gap in gaps:
        lines.append(
            f"| {gap['policy']} | {_pct(gap['planned'])} | {_pct(gap['optimal'])} | "
            f"{_pct(gap['more_victims'])} | {_pct(gap['more_lost_work'])} | "
            f"{_pct(gap['worse_alignment'])} |"
        )
    return [*lines, ""]


def _targets_section(by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]]) -> list[str]:
    """Each scenario x seed x policy on the target metrics, and which targets ours meets."""
    keys = (*TARGETS_HIGHER, *TARGETS_LOWER, "M1_affinity_hit_best_effort",
            "M1_affinity_hit_guaranteed")  # fmt: skip
    lines = [
        "## Targets, every scenario and seed",
        "",
        "Ours against the best baseline on each run: online served, goodput, work done and "
        "allocation at least as high, lost work at most as high, best-effort affinity hits at "
        "least B2's, guaranteed hits 1.0. A ✗ marks a target ours misses on that run; "
        "whether a miss is more than chance is the next section's question.",
        "",
        "| scenario | seed | policy | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    misses: list[str] = []
    for name, seeds in by_seed.items():
        for seed, summaries in seeds.items():
            missed = _missed_targets(summaries)
            misses += [f"{name} seed {seed}: {m}" for m in missed.values()]
            for policy, summary in summaries.items():
                cells = []
                for key in keys:
                    mark = " ✗" if policy == OURS and key in missed else ""
                    cells.append(_cell(summary.get(key)) + mark)
                lines.append(f"| {name} | {seed} | {policy} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets missed: " + ("; ".join(misses) if misses else "none") + ".",
        "",
        *_served_equals_bound(by_seed, misses),
        "Victims per preemption (M4) "
        "is a stated trade: the planner takes more, younger victims to lose less work (M5).",
        "",
    ]
    return lines


def _served_equals_bound(
    by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]], misses: list[str]
) -> list[str]:
    """Where ours misses modelled served load on a scenario whose every placement achieves the
    top tier (served equals bound for every policy and seed), the gap is replicas unbound."""
    names = [
        name
        for name, seeds in by_seed.items()
        if any(m.startswith(f"{name} ") and "M7_online" in m for m in misses)
        and all(
            abs(v["M7_online_served_fraction"] - v["M7_online_bound_fraction"]) < 1e-9
            for summaries in seeds.values()
            for v in summaries.values()
        )
    ]
    if not names:
        return []
    return [
        f"The misses on modelled served load on {', '.join(names)}: every placement there "
        "achieves the top tier (served equals bound for every policy and seed), so the gap is "
        "replicas unbound, through their victims' grace period when ours preempted more often "
        "(the counts above).",
        "",
    ]


# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def _t95(dof: int) -> float:
    known = [d for d in _T95 if d <= dof]
    return _T95[max(known)] if dof <= 30 else 1.96


@dataclasses.dataclass(frozen=True)
class SeedComparison:
    """Ours against one baseline on one metric over the seeds: the paired differences (ours
    minus theirs, signed so that positive is better for ours), their mean, its 95% interval."""

    baseline: str
    seeds: int
    ours_mean: float
    theirs_mean: float
    mean: float
    half_width: float
    wins: int  # seeds where ours is at least as good

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return "one seed"
        if self.mean - self.half_width > 0:
            return "ahead"
        if self.mean + self.half_width < 0:
            return "behind"
        return "within seed noise"


def compare_over_seeds(
    runs: dict[int, dict[str, dict[str, Any]]], key: str
) -> SeedComparison | None:
    """Ours against the baseline with the best mean on ``key`` over the seeds of one scenario,
    paired by seed (every policy of a seed replays the same event stream)."""
    higher = key not in TARGETS_LOWER
    seeds = [s for s, v in runs.items() if v.get(OURS, {}).get(key) is not None]
    baselines = {p for s in seeds for p in runs[s] if p != OURS}
    usable = [p for p in sorted(baselines) if all(runs[s].get(p, {}).get(key) is not None
                                                  for s in seeds)]  # fmt: skip
    if not seeds or not usable:
        return None

    def mean_of(policy: str) -> float:
        return statistics.fmean(runs[s][policy][key] for s in seeds)

    best = (max if higher else min)(usable, key=mean_of)
    sign = 1.0 if higher else -1.0
    diffs = [sign * (runs[s][OURS][key] - runs[s][best][key]) for s in seeds]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    half = _t95(len(diffs) - 1) * spread / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return SeedComparison(
        baseline=best,
        seeds=len(seeds),
        ours_mean=mean_of(OURS),
        theirs_mean=mean_of(best),
        mean=statistics.fmean(diffs),
        half_width=half,
        wins=sum(d >= 0 for d in diffs),
    )


def _over_seeds_section(by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]]) -> list[str]:
    """The targets over seeds: one run's win or loss can be chance (a replay is chaotic: one
    different placement early changes which nodes empty later), the mean paired difference
    and its interval say whether it is."""
    if max((len(runs) for runs in by_seed.values()), default=0) < 2:
        return []
    lines = [
        "## Targets over seeds",
        "",
        "Per scenario and target metric: ours against the baseline with the best mean over the "
        "seeds, paired by seed (every policy of a seed replays the same event stream). "
        "*difference*: the mean of ours minus theirs (for lost work, theirs minus ours: "
        "positive is better for ours) with its 95% interval (Student's t); *ahead* or "
        "*behind* when the interval excludes 0, *within seed noise* when it does not.",
        "",
        "| scenario | metric | seeds | ours (mean) | best baseline (mean) | difference | "
        "ours at least as good | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    noise: dict[str, list[str]] = {}
    for name, runs in by_seed.items():
        for key in (*TARGETS_HIGHER, *TARGETS_LOWER):
            c = compare_over_seeds(runs, key)
            if c is None:
                continue
            relative = f" ({c.mean / abs(c.theirs_mean):+.2%})" if c.theirs_mean else ""
            lines.append(
                f"| {name} | {key} | {c.seeds} | {_fine(c.ours_mean)} | {c.baseline} "
                f"{_fine(c.theirs_mean)} | {_plus_minus(c.mean, c.half_width)}{relative} | "
                f"{c.wins} of {c.seeds} | {c.verdict} |"
            )
            if c.verdict != "ahead":
                noise.setdefault(name, []).append(f"{key} ({c.verdict})")
    lines.append("")
    for name, keys in noise.items():
        lines.append(f"- {name}: not ahead on {', '.join(keys)}.")
    return [*lines, ""] if noise else lines


def _missed_targets(summaries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Target metric -> what ours missed it by, for one run (exact comparisons: no slack)."""
    ours = summaries[OURS]
    others = {p: v for p, v in summaries.items() if p != OURS}
    missed: dict[str, str] = {}
    for key in (*TARGETS_HIGHER, *TARGETS_LOWER):
        values = {p: v[key] for p, v in others.items() if v.get(key) is not None}
        if not values or ours.get(key) is None:
            continue
        higher = key in TARGETS_HIGHER
        best = (max if higher else min)(values, key=lambda p: values[p])
        if (ours[key] < values[best]) if higher else (ours[key] > values[best]):
            missed[key] = (
                f"{key} ours {_fine(ours[key])}, {best} {_fine(values[best])} "
                f"({_ratio(ours[key], values[best], 2)})"
            )
            if key == "M7_online_served_fraction":
                missed[key] += _why_served(ours, summaries[best])
            elif key != "M5_lost_gpu_hours":
                lost = (ours["M5_lost_gpu_hours"], summaries[best]["M5_lost_gpu_hours"])
                missed[key] += f"; lost work there {_cell(lost[0])} vs {_cell(lost[1])} GPU-h"
    be = ours.get("M1_affinity_hit_best_effort")
    b2 = summaries.get(B2, {}).get("M1_affinity_hit_best_effort")
    if be is not None and b2 is not None and be < b2:
        missed["M1_affinity_hit_best_effort"] = (
            f"M1_affinity_hit_best_effort ours {_cell(be)}, {B2} {_cell(b2)}"
        )
    guaranteed = ours.get("M1_affinity_hit_guaranteed")
    if guaranteed is not None and guaranteed < 1.0:
        missed["M1_affinity_hit_guaranteed"] = (
            f"M1_affinity_hit_guaranteed ours {_cell(guaranteed)}"
        )
    return missed


def _why_served(ours: dict[str, Any], best: dict[str, Any]) -> str:
    """What the served gap is made of: replicas bound (the tiers were the same when the bound
    fractions differ as much as the served ones) and preemptions (a preemptor is unbound
    through its victims' grace period)."""
    return (
        f": replicas bound {_fine(ours['M7_online_bound_fraction'])} vs "
        f"{_fine(best['M7_online_bound_fraction'])}, preemptions {ours['preemptions']} vs "
        f"{best['preemptions']}"
    )


def _fine(value: object) -> str:
    """Enough digits to show the difference a target comparison found."""
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.4f}"
    return _cell(value)


def _plus_minus(mean: float, half: float) -> str:
    """``mean ± half`` to two significant digits of the interval's half width."""
    decimals = 4 if half <= 0 else max(0, 1 - math.floor(math.log10(half)))
    return f"{mean:,.{decimals}f} ± {half:,.{decimals}f}"


def _losses_section(by_seed: dict[str, dict[int, dict[str, dict[str, Any]]]]) -> list[str]:
    """Each scenario x metric where ours is more than 1% behind the best policy on some seed,
    with how many seeds and the ranges of both."""
    lines = ["## Where ours does not win", ""]
    for name, seeds in by_seed.items():
        for key in HIGHER_IS_BETTER + LOWER_IS_BETTER:
            behind = [loss for s in seeds.values() if (loss := _behind(s, key)) is not None]
            if not behind:
                continue
            ours = _span([b[0] for b in behind])
            best = _span([b[2] for b in behind])
            policies = ", ".join(sorted({b[1] for b in behind}))
            count = f" on {len(behind)} of {len(seeds)} seeds" if len(seeds) > 1 else ""
            lines.append(f"- {name}: **{key}**{count} — ours {ours}, best {policies} {best}.")
    lines += [
        "",
        "Differences under 1% are not listed here; the targets table above compares exactly. "
        "Known limits of this evaluation: the throughput model per tier is derived from a cost "
        "model at a stated model size and link bandwidths, not measured (the inference worker's "
        "own benchmarks will replace it); preemptors bind one grace "
        "period after their victims are evicted, so M6 is the grace period by construction; "
        "there are no PodDisruptionBudgets or gangs in these traces, so M4's broken gangs and "
        "M10's PDB comparison are exercised only by the unit and end-to-end tests; decision "
        "latencies are Python in-process times on this machine with both cores busy.",
    ]
    return lines


def _behind(summaries: dict[str, dict[str, Any]], key: str) -> tuple[float, str, float] | None:
    """(ours, best policy, its value) when ours is more than 1% behind on ``key``, else None."""
    higher = key in HIGHER_IS_BETTER
    values = {p: v[key] for p, v in summaries.items() if v.get(key) is not None}
    if OURS not in values or len(values) < 2:
        return None
    best_policy = (max if higher else min)(values, key=lambda p: values[p])
    ours, best = values[OURS], values[best_policy]
    worse = ours < best if higher else ours > best
    if best_policy == OURS or not worse or abs(ours - best) <= 0.01 * max(abs(best), 1e-9):
        return None
    return ours, best_policy, best


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return _cell(low) if _cell(low) == _cell(high) else f"{_cell(low)} to {_cell(high)}"


_MODEL_STATEMENT = (
    f"a Llama-2-70B-shaped model (hidden {_MODEL.hidden}, MLP {_MODEL.intermediate}, "
    f"{_MODEL.layers} layers, grouped-query KV of {_MODEL.kv_dim}) at TP {_MODEL.tp} in BF16 on "
    f"A100-class GPUs ({_MODEL.flops / 1e12:.0f} TFLOP/s effective: "
    f"{_MODEL.peak_flops / 1e12:.0f} peak at {_MODEL.efficiency:.0%}), one "
    f"serial step of {_MODEL.tokens} tokens (the worker engine's max_batched_tokens) through "
    "the worker's per-layer cost model (tidal.inference_worker.iso_split: attention + MLP + two "
    "ring all-reduces of latency + 2(n-1)/n x tokens x hidden x 2 bytes / bandwidth), at the "
    "link bandwidths per direction of tidal.topology's link weights: "
    + ", ".join(f"{tier} {bw / 1e9:g} GB/s" for tier, bw in _MODEL.bandwidth)
    + " (NVLink: the HGX A100's NV12; numa: across host bridges; socket and node: SYS), "
    "latency "
    + ", ".join(f"{tier} {lat * 1e6:g} µs" for tier, lat in _MODEL.latency)
    + ". The factor is the NVLink step time over the tier's (tidal.simulator.throughput."
    "ThroughputModel)."
)


def _model_text(weights: dict[str, float]) -> str:
    return "(" + ", ".join(f"{tier} {value:g}" for tier, value in weights.items()) + ")"


def _gain(ours: float, base: float) -> float:
    return ours / base - 1 if base else 0.0


def _ratio(ours: float, base: float, digits: int = 1) -> str:
    if not base:
        return "n/a"
    return f"{ours / base - 1:+.{digits}%}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)

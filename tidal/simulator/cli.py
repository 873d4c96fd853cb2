"""``tidal simulate``: load a scenario's traces, say what was loaded and dropped, replay every
policy with a progress bar, and print the metrics side by side (``--dry-run``: stop after the
loading summary; ``--dashboard``: also write a replay of the day as tidal's web view)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.progress import Progress
from rich.table import Table

from tidal.placement import make_policy
from tidal.simulator.data import DataError
from tidal.simulator.replay import record_replay, recorded_policy, write_dashboard
from tidal.simulator.report import LoadReport
from tidal.simulator.run import Inputs, prepare, simulate
from tidal.simulator.scenario import Scenario, ScenarioError, load_scenario

console = Console()


def simulate_command(
    scenario_file: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            help="Scenario YAML, or a bundled one by name (openb-day, topology-rich, "
            "nvswitch-control). Default: the openb day.",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="Sample 160 nodes of the cluster: seconds, not minutes.")
    ] = False,
    policy: Annotated[
        list[str] | None, typer.Option(help="Policies to replay (default: all).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for results.json and overview.png.")] = Path(
        "out/simulate"
    ),
    plots: Annotated[bool, typer.Option(help="Write the overview figure.")] = True,
    workers: Annotated[
        int | None, typer.Option(help="Processes replaying policies (default: one per core).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Load the traces and print what was loaded and dropped; no replay."
        ),
    ] = False,
    dashboard: Annotated[
        Path | None,
        typer.Option(
            help="Also write the day as tidal's web view to this HTML file, to watch offline "
            "(a replay of the tidal policy, or of the first one replayed)."
        ),
    ] = None,
    dashboard_every: Annotated[
        float, typer.Option(min=1.0, help="Simulated minutes between the web view's frames.")
    ] = 10.0,
) -> None:
    """Replay a day of real traces through the placement core, every policy side by side."""
    scenario = _scenario(scenario_file, quick, policy)
    if dashboard is not None:
        _check_writable(dashboard)  # before the replay, not after minutes of it
    inputs = _load(scenario)
    console.print(loaded_summary(inputs.report))
    if dry_run:
        return
    result = _replay(scenario, inputs, workers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    console.print(summary_table(result))
    console.print(f"results: {out / 'results.json'}")
    if plots:
        from tidal.simulator.plots import write_overview  # noqa: PLC0415  (matplotlib is slow to import)

        console.print(f"figure:  {write_overview(result, out / 'overview.png')}")
    if dashboard is not None:
        _dashboard(scenario, inputs, dashboard, dashboard_every * 60)


def _check_writable(path: Path) -> None:
    folder = next((p for p in path.resolve().parents if p.exists()), Path("/"))
    if path.is_dir() or not os.access(folder, os.W_OK):
        why = "is a folder" if path.is_dir() else f"cannot be written in {folder}"
        raise typer.BadParameter(f"{path} {why}", param_hint="--dashboard")


def _dashboard(scenario: Scenario, inputs: Inputs, path: Path, every_s: float) -> None:
    policy = recorded_policy(scenario)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"recording the web view of {policy}", total=scenario.hours * 3600)
        frames = record_replay(
            scenario, inputs, policy, every_s, lambda now: progress.update(task, completed=now)
        )
    written = write_dashboard(path, frames).resolve()
    console.print(f"web view: {written} ({len(frames)} frames of {policy})")
    console.print(f"  open it in a browser: file://{written}")


def _scenario(path: Path | None, quick: bool, policies: list[str] | None) -> Scenario:
    try:
        scenario = load_scenario(path) if path else Scenario()
    except ScenarioError as err:
        raise typer.BadParameter(str(err), param_hint="--scenario") from err
    if quick:
        scenario = scenario.quick()
    for name in policies or ():
        try:
            make_policy(name)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--policy") from err
    if policies:
        scenario = dataclasses.replace(scenario, policies=tuple(policies))
    return scenario


def _load(scenario: Scenario) -> Inputs:
    try:
        with console.status("reading traces"):
            return prepare(scenario)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err


def _replay(scenario: Scenario, inputs: Inputs, workers: int | None) -> dict[str, Any]:
    horizon = scenario.hours * 3600
    with Progress(console=console, transient=True) as progress:
        tasks = {p: progress.add_task(f"replaying {p}", total=horizon) for p in scenario.policies}
        try:
            return simulate(
                scenario, lambda p, now: progress.update(tasks[p], completed=now), workers, inputs
            )
        except DataError as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from err


def loaded_summary(report: LoadReport) -> RenderableType:
    """What was loaded: the files, nodes per preset, jobs per class and size, rows dropped."""
    parts: list[RenderableType] = []
    for source in report.sources:
        parts.append(
            f"[bold]{source.kind}[/bold]: {source.location} (format {source.format}): "
            f"{source.rows:,} rows, {source.kept:,} used"
        )
        parts.extend(f"  note: {note}" for note in source.notes)
    parts.append(_nodes_table(report))
    if report.job_groups:
        parts.append(_jobs_table(report))
    drops = _drops_table(report)
    parts.append(drops if drops.row_count else "rows dropped: none")
    parts.extend(f"replay: {line}" for line in report.replay)
    return Group(*parts)


def _nodes_table(report: LoadReport) -> Table:
    table = Table("GPU model", "GPUs", "preset", "chosen by", "nodes", title="nodes per preset")
    for group in report.node_groups:
        model = group.gpu_model or "-"
        table.add_row(model, str(group.gpus), group.preset, group.chosen_by, f"{group.nodes:,}")
    return table


def _jobs_table(report: LoadReport) -> Table:
    table = Table(
        "class",
        "GPUs per worker",
        "jobs",
        "gangs (workers > 1)",
        "most workers",
        "replayed",
        "GPU-model constrained",
        title="jobs per class and size",
    )
    for group in report.job_groups:
        table.add_row(
            group.job_class,
            str(group.gpus),
            f"{group.jobs:,}",
            f"{group.gangs:,}",
            str(group.max_workers),
            f"{group.replayed:,}",
            f"{group.constrained:,}",
        )
    return table


def _drops_table(report: LoadReport) -> Table:
    table = Table("file", "reason", "rows", title="rows dropped")
    for source in report.sources:
        for reason, rows in source.drops.most_common():
            table.add_row(Path(source.location).name, reason, f"{rows:,}")
    return table


def summary_table(result: dict[str, Any]) -> Table:
    summaries = [p["summary"] for p in result["policies"]]
    table = Table(
        "metric",
        *(s["policy"] for s in summaries),
        title=f"{result['scenario']}: {result['nodes']} nodes, {result['gpus']} GPUs, "
        f"{result['batch_jobs']} batch jobs",
    )
    for key in summaries[0]:
        if key != "policy":
            table.add_row(key, *(_cell(s[key]) for s in summaries))
    return table


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)

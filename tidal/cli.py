"""``tidal``: one command line for every component."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tidal.devcluster.cli import app as dev_cluster_app
from tidal.inference_worker.cli import app as worker_app
from tidal.node_agent.cli import app as node_agent_app
from tidal.operator.cli import app as operator_app
from tidal.placement import (
    POLICY_NAMES,
    ClusterSnapshot,
    NodeInfo,
    PdbInfo,
    Plan,
    PodInfo,
    PodRequest,
    TopologyMode,
    make_policy,
)
from tidal.scheduler_extender.cli import (
    extender_command,
    extender_rbac_command,
    scheduler_config_command,
)
from tidal.simulator import ScenarioError
from tidal.simulator.cli import simulate_command
from tidal.simulator.data import DataError
from tidal.topology import (
    NODE_TIERS,
    Tier,
    TopologyError,
    bits,
    load_preset,
    preset_names,
    preset_shape,
)

app = typer.Typer(
    help="tidal: topology-aware placement and preemption of LLM workloads on GPU clusters.",
    no_args_is_help=True,
)
topo_app = typer.Typer(help="Inspect GPU topology presets.", no_args_is_help=True)
chart_app = typer.Typer(
    help="The Helm chart's generated parts (CRDs, ClusterRole rules, admission policy, "
    "PriorityClasses, Chart.yaml, values.schema.json, the README's values table), from the "
    "Python that defines them.",
    no_args_is_help=True,
)
app.add_typer(topo_app, name="topo")
app.add_typer(chart_app, name="chart")
app.add_typer(dev_cluster_app, name="dev-cluster")
app.add_typer(operator_app, name="operator")
app.add_typer(node_agent_app, name="node-agent")
app.add_typer(worker_app, name="worker")
app.command("extender")(extender_command)
app.command("scheduler-config")(scheduler_config_command)
app.command("extender-rbac")(extender_rbac_command)
console = Console()


@topo_app.command("list")
def topo_list() -> None:
    """List the bundled topology presets."""
    table = Table("preset", "GPUs", "GPU model", "description")
    for name in preset_names():
        topology = load_preset(name)
        table.add_row(name, str(topology.gpu_count), topology.gpu_model, topology.description)
    console.print(table)


@topo_app.command("show")
def topo_show(
    preset: Annotated[str, typer.Argument(help="Preset name, see `tidal topo list`.")],
) -> None:
    """Print a preset's GPU link matrix (as `nvidia-smi topo -m` does) and its domains per tier."""
    try:
        topology = load_preset(preset)
    except TopologyError as err:
        raise typer.BadParameter(str(err), param_hint="PRESET") from err
    shape = preset_shape(preset)
    console.print(f"[bold]{topology.name}[/bold]: {topology.description}")
    console.print(_link_matrix(topology, shape))
    console.print(_domain_table(shape))
    if topology.rack_domain:
        domain = topology.rack_domain
        console.print(
            f"rack NVLink domain: {domain.name}, {domain.nodes} nodes x {shape.gpu_count} GPUs"
        )
    console.print(
        "Legend: X self · NV# NVLink lanes · PIX one PCIe switch · PXB several switches · "
        "PHB host bridge · NODE across host bridges in a NUMA node · SYS across NUMA nodes"
    )


def _link_matrix(topology: Any, shape: Any) -> Table:
    numa = topology.cpu_cores()
    table = Table(
        "",
        *(f"GPU{g}" for g in range(shape.gpu_count)),
        "NUMA",
        "CPU cores",
        title="GPU link matrix",
    )
    for gpu in range(shape.gpu_count):
        node = shape.gpu_numa[gpu]
        table.add_row(f"GPU{gpu}", *shape.link_names[gpu], str(node), str(numa[node]))
    return table


def _domain_table(shape: Any) -> Table:
    """Per tier, the hardware's domains and the largest GPU sets satisfying the tier (every
    pair at that tier or better: docs/tiers.md); alignment follows the second column."""
    table = Table(
        "tier",
        "hardware domains",
        "largest sets satisfying it",
        title="Alignment (GPU indices)",
    )
    for tier in NODE_TIERS:
        table.add_row(tier.label, _sets(shape.domains[tier]), _sets(shape.tier_domains(tier)))
    return table


def _sets(masks: Any) -> str:
    return " ".join("{" + ",".join(map(str, bits(mask))) + "}" for mask in masks)


@app.command("plan")
def plan(
    scenario: Annotated[Path, typer.Argument(help="YAML file: nodes, pods, pdbs, request.")],
    policy: Annotated[
        list[str] | None, typer.Option(help="Policies to compare (default: all).")
    ] = None,
) -> None:
    """Plan one preemption with every policy side by side and show what each would evict."""
    snapshot, request = _load_plan_scenario(scenario)
    table = Table(
        "policy",
        "node",
        "GPUs",
        "tier",
        "victims",
        "lost GPU·s",
        "waste",
        "PDB viol.",
        "time ms",
        title=f"Preempting for {request.name}: {request.gpus} GPUs, "
        f"{request.mode.value} {request.tier.label}",
    )
    for name in policy or POLICY_NAMES:
        chosen = _policy_or_exit(name)
        started = time.perf_counter()
        placed = chosen.place(snapshot, request)
        result = chosen.preempt(snapshot, request) if placed is None else None
        elapsed = f"{(time.perf_counter() - started) * 1000:.2f}"
        if placed is not None:
            table.add_row(
                name,
                placed.node,
                str(bits(placed.gpus)),
                placed.tier.label,
                "(fits free)",
                "0",
                "0",
                "0",
                elapsed,
            )
        elif isinstance(result, Plan):
            table.add_row(
                name,
                result.node,
                str(result.gpu_list),
                result.tier.label,
                ", ".join(result.victims),
                f"{result.cost.lost_work:.0f}",
                str(result.cost.waste_gpus),
                str(result.cost.pdb_violations),
                elapsed,
            )
        else:
            table.add_row(name, "-", "-", "-", result.reason if result else "", "", "", "", elapsed)
    console.print(table)


def _policy_or_exit(name: str) -> Any:
    try:
        return make_policy(name)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--policy") from err


def _load_plan_scenario(path: Path) -> tuple[ClusterSnapshot, PodRequest]:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"{path}: {err}", param_hint="SCENARIO") from err
    try:
        return _scenario(spec)
    except KeyError as err:
        raise typer.BadParameter(f"{path}: missing field {err}", param_hint="SCENARIO") from err
    except (TypeError, ValueError, TopologyError) as err:
        raise typer.BadParameter(f"{path}: {err}", param_hint="SCENARIO") from err


def _scenario(spec: dict[str, Any]) -> tuple[ClusterSnapshot, PodRequest]:
    if not isinstance(spec, dict):
        raise ValueError("expected a mapping with nodes, pods, pdbs and request")
    nodes = [
        NodeInfo(
            n["name"],
            preset_shape(n["preset"]),
            int(n.get("cpu_milli", 64_000)),
            int(n.get("memory_mib", 512_000)),
            nvlink_domain=n.get("nvlink_domain"),
        )
        for n in spec["nodes"]
    ]
    pods = [
        PodInfo(
            uid=p["name"],
            name=p["name"],
            node=p["node"],
            gpus=sum(1 << g for g in p["gpus"]),
            priority=int(p.get("priority", 0)),
            cpu_milli=int(p.get("cpu_milli", 0)),
            memory_mib=int(p.get("memory_mib", 0)),
            preemptible=bool(p.get("preemptible", True)),
            pdb=p.get("pdb"),
            gang=p.get("gang"),
            start_time=float(p.get("start", 0)),
        )
        for p in spec.get("pods", [])
    ]
    pdbs = [PdbInfo(b["name"], int(b["disruptions_allowed"])) for b in spec.get("pdbs", [])]
    r = spec["request"]
    request = PodRequest(
        uid=r["name"],
        name=r["name"],
        gpus=int(r["gpus"]),
        priority=int(r["priority"]),
        cpu_milli=int(r.get("cpu_milli", 0)),
        memory_mib=int(r.get("memory_mib", 0)),
        mode=TopologyMode(r.get("mode", "best-effort")),
        tier=Tier.parse(r.get("tier", "nvlink")),
    )
    return ClusterSnapshot(nodes, pods, pdbs, now=float(spec.get("now", 0))), request


app.command("simulate")(simulate_command)


@app.command("evaluate")
def evaluate_command(
    out: Annotated[
        Path, typer.Option(help="Folder for evaluation.md and evaluation/ (figures, JSON).")
    ] = Path("docs"),
    quick: Annotated[bool, typer.Option(help="Sampled clusters: seconds, not minutes.")] = False,
    seed: Annotated[
        list[int] | None,
        typer.Option(help="Replay every scenario once per seed (repeat the option; default: 7)."),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1, help="Replay every scenario with each of the seeds 1..N (instead of --seed)."
        ),
    ] = None,
) -> None:
    """Regenerate the evaluation report: the bundled scenarios with every policy (once per
    seed), the throughput-model sweep and the optimality gap against brute force."""
    from tidal.simulator.evaluation import (  # noqa: PLC0415  (matplotlib)
        DEFAULT_SEEDS,
        SCENARIOS,
        evaluate,
    )

    if seed and seeds:
        console.print("[red]error:[/red] give --seed or --seeds, not both")
        raise typer.Exit(2)
    chosen = tuple(range(1, seeds + 1)) if seeds else tuple(dict.fromkeys(seed or DEFAULT_SEEDS))
    command = (
        "tidal evaluate"
        + (" --quick" if quick else "")
        + (f" --seeds {seeds}" if seeds else "".join(f" --seed {s}" for s in seed or ()))
        + f" --out {out}"
    )
    with Progress(console=console, transient=True) as progress:
        tasks: dict[tuple[str, str], Any] = {}

        def update(scenario: str, policy: str, now: float) -> None:
            key = (scenario, policy)
            if key not in tasks:
                tasks[key] = progress.add_task(f"{scenario}: {policy}", total=24 * 3600)
            progress.update(tasks[key], completed=now)

        try:
            report = evaluate(out, quick, update, command, chosen)
        except (DataError, ScenarioError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from err
    console.print(f"report: {report} ({len(SCENARIOS)} scenarios)")


ChartDir = Annotated[
    Path,
    typer.Option(help="The chart's directory.", file_okay=False),
]


@chart_app.command("generate")
def chart_generate(chart_dir: ChartDir = Path("charts/tidal")) -> None:
    """Write the chart's generated files that changed (what `make chart` runs)."""
    from tidal.chartgen import write_files  # noqa: PLC0415

    changed = write_files(chart_dir, on_write=typer.echo)
    if not changed:
        typer.echo(f"{chart_dir}: generated files are current")


@chart_app.command("check")
def chart_check(chart_dir: ChartDir = Path("charts/tidal")) -> None:
    """Exit 1 naming the generated files that are stale (regenerate with `make chart`)."""
    from tidal.chartgen import stale_files  # noqa: PLC0415

    stale = stale_files(chart_dir)
    for path in stale:
        typer.secho(f"stale: {chart_dir / path}", fg="red", err=True)
    if stale:
        typer.echo("run `make chart` to regenerate them", err=True)
        raise typer.Exit(1)
    typer.echo(f"{chart_dir}: generated files are current")


if __name__ == "__main__":  # pragma: no cover
    app()

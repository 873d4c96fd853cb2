"""``tidal node-agent``: discover GPUs, run the DaemonSet agent, or launch workers standalone."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml

from tidal.api import GPU_RESOURCE

if TYPE_CHECKING:  # the CLI imports its heavy modules only when a command runs
    from tidal.node_agent.facts import GpuBackend
    from tidal.node_agent.publish import Discovery

app = typer.Typer(
    help="The node agent: GPU discovery, GPUTopology publishing, the device plugin, and a "
    "standalone launcher for machines without Kubernetes.",
    no_args_is_help=True,
)

Fake = Annotated[
    str | None,
    typer.Option(envvar="TIDAL_FAKE_TOPOLOGY", help="Serve this preset instead of NVML."),
]
Fixture = Annotated[
    Path | None,
    typer.Option(
        envvar="TIDAL_TOPOLOGY_FIXTURE",
        help="Serve this topology file (preset schema or a GPUTopology) instead of NVML.",
        exists=True,
        dir_okay=False,
    ),
]
NodeName = Annotated[
    str,
    typer.Option(envvar="NODE_NAME", help="This node's name (downward API spec.nodeName)."),
]
LogLevel = Annotated[str, typer.Option(envvar="TIDAL_NODE_AGENT_LOG_LEVEL")]


def _logging(level: str) -> None:
    if level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(
            f"--log-level: {level!r} is not one of debug, info, warning, error"
        )
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _discovery(node: str, fake: str | None, fixture: Path | None) -> tuple[GpuBackend, Discovery]:
    from tidal.node_agent.backend import open_backend  # noqa: PLC0415
    from tidal.node_agent.facts import DiscoveryError  # noqa: PLC0415
    from tidal.node_agent.publish import Discovery  # noqa: PLC0415

    try:
        backend = open_backend(node, fake, fixture)
        return backend, Discovery.of(node, backend.facts())
    except DiscoveryError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error


@app.command("discover")
def discover_command(
    fake: Fake = None,
    fixture: Fixture = None,
    node_name: NodeName = "localhost",
    output: Annotated[
        str, typer.Option("--output", "-o", help="yaml (GPUTopology), matrix, or both.")
    ] = "both",
) -> None:
    """Print what this machine's GPUs look like: a GPUTopology object and the link matrix."""
    from tidal.node_agent.facts import render_matrix  # noqa: PLC0415
    from tidal.node_agent.publish import gpu_topology, topology_status  # noqa: PLC0415

    if output not in ("yaml", "matrix", "both"):
        raise typer.BadParameter(f"--output: {output!r} is not one of yaml, matrix, both")
    backend, discovery = _discovery(node_name, fake, fixture)
    try:
        samples = backend.sample()
    finally:
        backend.close()
    if output in ("yaml", "both"):
        obj = gpu_topology(discovery, node_uid="")
        del obj["metadata"]["ownerReferences"]  # the agent fills it in when it publishes
        obj["status"] = topology_status(discovery, samples)["status"]
        typer.echo(yaml.safe_dump(obj, sort_keys=False, width=100), nl=False)
    if output == "both":
        typer.echo()
    if output in ("matrix", "both"):
        typer.echo(render_matrix(discovery.facts))


@app.command("run")
def run_command(
    node_name: NodeName,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(envvar="KUBECONFIG", help="Kubeconfig; in-cluster config when unset."),
    ] = None,
    fake: Fake = None,
    fixture: Fixture = None,
    fake_health: Annotated[
        Path | None,
        typer.Option(
            envvar="TIDAL_FAKE_HEALTH",
            help="With --fake/--fixture: a file of unhealthy GPUs, lines 'INDEX REASON', read "
            "at every health sample (simulates XIDs).",
            dir_okay=False,
        ),
    ] = None,
    device_plugin: Annotated[
        bool, typer.Option(help="Serve the kubelet device plugin for the GPUs.")
    ] = True,
    plugin_dir: Annotated[
        Path, typer.Option(envvar="TIDAL_DEVICE_PLUGIN_DIR", help="The kubelet's plugin dir.")
    ] = Path("/var/lib/kubelet/device-plugins"),
    resource: Annotated[str, typer.Option(envvar="TIDAL_GPU_RESOURCE")] = GPU_RESOURCE,
    metrics_port: Annotated[
        int, typer.Option(envvar="TIDAL_NODE_AGENT_METRICS_PORT", help="0 turns it off.")
    ] = 9402,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between GPUTopology status heartbeats.", min=1)
    ] = 30.0,
    health_interval: Annotated[
        float, typer.Option(help="Seconds between GPU health samples.", min=0.1)
    ] = 5.0,
    log_level: LogLevel = "info",
) -> None:
    """Publish this node's GPUTopology and serve the device plugin until SIGTERM."""
    from tidal.node_agent.deviceplugin.server import PluginOptions  # noqa: PLC0415
    from tidal.node_agent.facts import DiscoveryError  # noqa: PLC0415
    from tidal.node_agent.run import AgentOptions, run_agent  # noqa: PLC0415

    _logging(log_level)
    if device_plugin and not plugin_dir.is_dir():
        raise typer.BadParameter(
            f"--plugin-dir: {plugin_dir} is not a directory (mount the kubelet's, or pass "
            "--no-device-plugin)"
        )
    options = AgentOptions(
        node=node_name,
        kubeconfig=kubeconfig,
        fake=fake,
        fixture=fixture,
        fake_health=fake_health,
        device_plugin=device_plugin,
        plugin=PluginOptions(directory=plugin_dir, resource=resource),
        metrics_port=metrics_port,
        heartbeat_s=heartbeat,
        health_interval_s=health_interval,
    )
    try:
        run_agent(options)
    except DiscoveryError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error


@app.command("manifests")
def manifests_command(
    namespace: Annotated[str, typer.Option(help="Namespace of the DaemonSet.")] = "tidal-system",
    image: Annotated[
        str | None,
        typer.Option(help="The tidal image (default ghcr.io/tidal-llm/tidal:<version>)."),
    ] = None,
    node_selector: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE, repeatable; nodes that run the agent.", show_default=False),
    ] = None,
    resource: Annotated[str, typer.Option(help="Extended resource served.")] = GPU_RESOURCE,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535)] = 9402,
    runtime_class: Annotated[
        str, typer.Option(help="RuntimeClass that mounts the NVIDIA driver; '' for none.")
    ] = "nvidia",
) -> None:
    """Print the agent's ServiceAccount, ClusterRole, binding and DaemonSet as YAML."""
    from tidal.node_agent.manifests import AgentDeployment, manifests  # noqa: PLC0415

    defaults = AgentDeployment()
    settings = AgentDeployment(
        namespace=namespace,
        image=image or defaults.image,
        node_selector=_key_values(node_selector) if node_selector else defaults.node_selector,
        resource=resource,
        metrics_port=metrics_port,
        runtime_class=runtime_class or None,
    )
    typer.echo(yaml.safe_dump_all(manifests(settings), sort_keys=False), nl=False)


def _key_values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--node-selector: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


@app.command("standalone")
def standalone_command(
    spec: Annotated[
        Path, typer.Option(help="Worker groups to run (YAML).", exists=True, dir_okay=False)
    ],
    fake: Fake = None,
    fixture: Fixture = None,
    dry_run: Annotated[bool, typer.Option(help="Print the placement and exit.")] = False,
    log_level: LogLevel = "info",
) -> None:
    """Place worker groups on this machine's GPUs and supervise them until SIGTERM."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from tidal.node_agent import standalone  # noqa: PLC0415

    _logging(log_level)
    backend, discovery = _discovery("localhost", fake, fixture)
    has_nvswitch = discovery.facts.nvswitch
    try:
        parsed = standalone.parse_spec(spec.read_text(), str(spec), has_nvswitch)
        healthy = [s.index for s in backend.sample() if s.healthy]
        slots = standalone.place(parsed, discovery, healthy)
    except (standalone.SpecError, standalone.PlacementError) as error:
        backend.close()
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from error
    table = Table(title=f"{len(discovery.facts.gpus)}x {discovery.facts.gpu_model}")
    for column in ("worker", "GPUs", "tier", "weakest link", "log"):
        table.add_column(column)
    supervisor = standalone.Supervisor(parsed, discovery, slots)
    for worker in supervisor.workers:
        env = worker.env
        table.add_row(
            worker.slot.name, env["TIDAL_GPU_IDS"], env["TIDAL_GPU_TIER"], env["TIDAL_GPU_LINK"],
            str(worker.log_path),
        )  # fmt: skip
    Console(stderr=True).print(table)
    if dry_run:
        backend.close()
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop())
    try:
        code = supervisor.run()
    finally:
        backend.close()
    raise typer.Exit(code)

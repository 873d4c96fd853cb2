"""``tidal dev-cluster``: a local control plane with fake GPU nodes, for trying tidal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tidal.devcluster.binaries import DevClusterError, build, default_binaries, find_binaries
from tidal.devcluster.cluster import (
    STATE_FILE,
    ClusterOptions,
    LocalCluster,
    node_ready,
)
from tidal.devcluster.nodes import node_names
from tidal.devcluster.process import http_ok, insecure_tls
from tidal.scheduler_extender.schedconfig import ExtenderConfig
from tidal.topology import preset_names

app = typer.Typer(
    help="A real local Kubernetes control plane (etcd, kube-apiserver, kube-scheduler, KWOK) "
    "with fake GPU nodes.",
    no_args_is_help=True,
)
console = Console()
DEFAULT_DIR = Path(
    os.environ.get("TIDAL_DEV_CLUSTER_DIR", Path.home() / ".cache" / "tidal" / "dev-cluster")
)
DirOption = Annotated[
    Path, typer.Option("--dir", help="Working directory (env TIDAL_DEV_CLUSTER_DIR).")
]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@app.command("build")
def build_command() -> None:
    """Build (or find cached) kube-apiserver, kube-scheduler, kube-controller-manager, etcd,
    KWOK, kubectl and helm. A cold build takes ~15 minutes on 2 cores."""
    try:
        binaries = build()
    except DevClusterError as error:
        _fail(str(error))
        return
    console.print(f"binaries in {binaries.control_plane_dir} and {binaries.tools_dir}")


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(min=0, help="Fake GPU nodes to create.")] = 4,
    preset: Annotated[
        list[str] | None,
        typer.Option(help="Topology preset of the nodes (repeat to mix; cycles through them)."),
    ] = None,
    directory: DirOption = DEFAULT_DIR,
    controller_manager: Annotated[
        bool, typer.Option(help="Also run kube-controller-manager (GC, Jobs, ServiceAccounts).")
    ] = True,
    extender: Annotated[
        bool, typer.Option(help="Run `tidal extender` and put it in kube-scheduler's config.")
    ] = False,
    extender_url: Annotated[
        str | None, typer.Option(help="urlPrefix of a tidal extender running elsewhere.")
    ] = None,
    operator: Annotated[
        bool, typer.Option(help="Run `tidal operator run` (installs the CRDs first).")
    ] = False,
) -> None:
    """Start the control plane in the background and create fake GPU nodes."""
    presets = preset or ["dgx-h100", "dgx1-v100"]
    unknown = sorted(set(presets) - set(preset_names()))
    if unknown:
        _fail(f"--preset: unknown {', '.join(unknown)}; choose from {', '.join(preset_names())}")
    if (directory / STATE_FILE).exists() and any(LocalCluster.attach(directory).running().values()):
        _fail(f"a dev cluster is already up in {directory}; run `tidal dev-cluster down` first")
    try:
        binaries = find_binaries()
    except DevClusterError:
        console.print("control-plane binaries missing: building them (cold: ~15 min)")
        binaries = build()
    if extender and extender_url:
        _fail("--extender and --extender-url exclude each other")
    options = ClusterOptions(
        directory,
        controller_manager=controller_manager,
        extender=ExtenderConfig(extender_url) if extender_url else None,
        run_extender=extender,
        run_operator=operator,
    )
    local = LocalCluster(options, binaries)
    try:
        with console.status("starting control plane") as status:
            local.start(on_step=status.update)
            status.update(f"creating {nodes} GPU nodes")
            names = local.add_gpu_nodes(node_names(nodes, presets))
            status.update("waiting for the nodes to be Ready")
            local.wait_nodes_ready(names)
    except DevClusterError as error:
        local.stop(remove=False)
        _fail(f"{error}\nlogs in {local.log_dir}")
    local.detach()
    console.print(f"dev cluster up: {nodes} GPU nodes ({', '.join(presets)}) at {local.server}")
    console.print(f"  export KUBECONFIG={local.kubeconfig}")
    console.print(f"  kubectl: {default_binaries().path('kubectl')}")
    console.print(f"  logs:    {local.log_dir}")


@app.command("status")
def status(directory: DirOption = DEFAULT_DIR) -> None:
    """Show which components run, whether the apiserver is ready, and the nodes."""
    try:
        local = LocalCluster.attach(directory)
    except DevClusterError as error:
        _fail(str(error))
        return
    table = Table("component", "pid", "running")
    for name, alive in local.running().items():
        pid = local.components[name].pid
        table.add_row(name, str(pid), "[green]yes[/green]" if alive else "[red]no[/red]")
    console.print(table)
    ready = http_ok(f"{local.server}/livez", insecure_tls())
    console.print(f"apiserver {local.server}: {'live' if ready else 'not answering'}")
    if ready:
        from kubernetes import client  # noqa: PLC0415 - heavy import, only on use

        nodes = client.CoreV1Api(local.api_client()).list_node().items
        ready_nodes = sum(node_ready(n) for n in nodes)
        console.print(f"nodes: {ready_nodes}/{len(nodes)} Ready")
    console.print(f"export KUBECONFIG={local.kubeconfig}")
    console.print(f"kubectl: {default_binaries().path('kubectl')}")


@app.command("down")
def down(directory: DirOption = DEFAULT_DIR) -> None:
    """Stop every component and remove the working directory."""
    if not (directory / STATE_FILE).exists():
        console.print(f"no dev cluster in {directory}")
        return
    LocalCluster.attach(directory).stop(remove=True)
    console.print(f"dev cluster in {directory} stopped and removed")

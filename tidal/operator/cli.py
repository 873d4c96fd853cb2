"""``tidal operator``: run the operator, install or print its manifests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import yaml

app = typer.Typer(help="The LLMService / LLMBatchJob operator (kopf).", no_args_is_help=True)

Kubeconfig = Annotated[
    Path | None,
    typer.Option(
        envvar="KUBECONFIG",
        help="Kubeconfig; in-cluster config when unset.",
        exists=True,
        dir_okay=False,
    ),
]

AllowedPriorityClasses = Annotated[
    str,
    typer.Option(
        "--allowed-priority-classes",
        envvar="TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES",
        help="PriorityClasses workloads may name beyond tidal-online / tidal-batch "
        "(comma-separated); the CRDs and the operator must be given the same list.",
    ),
]


@app.command("run")
def run_command(
    kubeconfig: Kubeconfig = None,
    namespace: Annotated[
        list[str] | None,
        typer.Option(envvar="TIDAL_OPERATOR_NAMESPACES", help="Watch only these (repeatable)."),
    ] = None,
    liveness: Annotated[
        str | None,
        typer.Option(
            envvar="TIDAL_OPERATOR_LIVENESS",
            help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.",
        ),
    ] = None,
    peering: Annotated[
        str | None,
        typer.Option(
            envvar="TIDAL_OPERATOR_PEERING",
            help="ClusterKopfPeering name, for more than one replica (one is active).",
        ),
    ] = None,
    install_crds: Annotated[
        bool, typer.Option("--install-crds", help="Apply the CRDs and PriorityClasses first.")
    ] = False,
    log_level: Annotated[str, typer.Option(envvar="TIDAL_OPERATOR_LOG_LEVEL")] = "info",
    allowed_priority_classes: AllowedPriorityClasses = "",
    metrics_port: Annotated[
        int,
        typer.Option(
            envvar="TIDAL_OPERATOR_METRICS_PORT",
            min=0,
            max=65535,
            help="Serve Prometheus /metrics (tidal_llmservice_*, tidal_llmbatchjob_*, "
            "tidal_batch_goodput_*) on this port, every address; 0: none.",
        ),
    ] = 9403,  # tidal.operator.metrics.DEFAULT_PORT (not imported: the CLI starts light)
) -> None:
    """Reconcile LLMService and LLMBatchJob objects until interrupted."""
    from tidal.operator.crds import parse_priority_classes  # noqa: PLC0415
    from tidal.operator.run import OperatorOptions, run_operator  # noqa: PLC0415 - kopf is heavy

    if log_level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(
            f"--log-level: {log_level!r} is not one of debug, info, warning, error"
        )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_operator(
        OperatorOptions(
            kubeconfig=kubeconfig,
            namespaces=tuple(namespace or ()),
            liveness=liveness,
            peering=peering,
            install=install_crds,
            extra_priority_classes=parse_priority_classes(allowed_priority_classes),
            metrics_port=metrics_port,
        )
    )


@app.command("install-crds")
def install_command(
    kubeconfig: Kubeconfig = None, allowed_priority_classes: AllowedPriorityClasses = ""
) -> None:
    """Apply the CRDs, the PriorityClasses, the operator's and the workers' ClusterRoles and
    the workers' admission policy (server-side apply)."""
    from tidal.kubeclient import api_client  # noqa: PLC0415
    from tidal.operator.crds import parse_priority_classes  # noqa: PLC0415
    from tidal.operator.kube import install  # noqa: PLC0415

    extra = parse_priority_classes(allowed_priority_classes)
    for applied in install(api_client(kubeconfig), extra_priority_classes=extra):
        typer.echo(f"applied {applied}")


@app.command("manifests")
def manifests_command(
    namespace: Annotated[
        str, typer.Option(help="Namespace of the operator's ServiceAccount.")
    ] = "tidal-system",
    allowed_priority_classes: AllowedPriorityClasses = "",
) -> None:
    """Print the CRDs, PriorityClasses, the operator's ClusterRole, ServiceAccount and binding,
    the workers' ClusterRole and admission policy as YAML (for kubectl apply or a chart); the
    operator creates the workers' ServiceAccount and RoleBinding in each namespace itself."""
    from tidal.operator.crds import parse_priority_classes  # noqa: PLC0415
    from tidal.operator.manifests import manifests, operator_identity  # noqa: PLC0415

    extra = parse_priority_classes(allowed_priority_classes)
    objects = [*manifests(extra), *operator_identity(namespace)]
    typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)

"""``tidal extender``: run the scheduler extender (flags or TIDAL_EXTENDER_* environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _existing_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise typer.BadParameter(f"no such file: {path}")
    return path


def extender_command(
    host: Annotated[
        str,
        typer.Option(
            envvar="TIDAL_EXTENDER_HOST",
            help="Address to listen on. Loopback unless --tls-client-ca is given: whoever "
            "reaches the verbs can bind and evict pods.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="TIDAL_EXTENDER_PORT", min=1, max=65535, help="Port to listen on.")
    ] = 8888,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            envvar="KUBECONFIG",
            callback=_existing_file,
            help="Kubeconfig; in-cluster config when unset.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(envvar="TIDAL_EXTENDER_TLS_CERT", callback=_existing_file)
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="TIDAL_EXTENDER_TLS_KEY", callback=_existing_file)
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="TIDAL_EXTENDER_TLS_CLIENT_CA",
            callback=_existing_file,
            help="CA bundle: callers must present a client certificate it signed (mutual TLS; "
            "kube-scheduler's extender tlsConfig certFile/keyFile).",
        ),
    ] = None,
    health_port: Annotated[
        int,
        typer.Option(
            envvar="TIDAL_EXTENDER_HEALTH_PORT",
            min=0,
            max=65535,
            help="Plain-HTTP port for /healthz, /readyz and /metrics only (no verbs), for "
            "probes and Prometheus; 0: none.",
        ),
    ] = 0,
    health_host: Annotated[
        str, typer.Option(envvar="TIDAL_EXTENDER_HEALTH_HOST", help="Address of the health port.")
    ] = "0.0.0.0",
    max_request_bytes: Annotated[
        int,
        typer.Option(
            envvar="TIDAL_EXTENDER_MAX_REQUEST_BYTES",
            min=1024,
            help="Largest request body accepted (413 beyond).",
        ),
    ] = 4 * 2**20,
    reservation_ttl: Annotated[
        float,
        typer.Option(
            envvar="TIDAL_EXTENDER_RESERVATION_TTL",
            min=1.0,
            help="Seconds a preemptor's reservation holds its GPUs before it expires.",
        ),
    ] = 300.0,
    log_level: Annotated[
        str, typer.Option(envvar="TIDAL_EXTENDER_LOG_LEVEL", help="debug, info, warning, error.")
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="TIDAL_EXTENDER_LOG_FORMAT", help="text or json.")
    ] = "text",
) -> None:
    """Run the kube-scheduler HTTP extender (filter, prioritize, preempt, bind)."""
    # Heavy imports (prometheus, starlette, kubernetes) only when the extender really starts.
    from tidal.scheduler_extender.extender import ExtenderSettings  # noqa: PLC0415
    from tidal.scheduler_extender.run import ServeOptions, serve  # noqa: PLC0415
    from tidal.scheduler_extender.server import Limits  # noqa: PLC0415

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if log_level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(
            f"--log-level: {log_level!r} is not one of debug, info, warning, error"
        )
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"--log-format: {log_format!r} is not one of text, json")
    options = ServeOptions(
        host=host,
        port=port,
        kubeconfig=kubeconfig,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        health_host=health_host,
        health_port=health_port,
        limits=Limits(max_body_bytes=max_request_bytes),
        settings=ExtenderSettings(reservation_ttl_s=reservation_ttl),
        log_level=log_level,
        log_format=log_format,
    )
    try:
        options.check()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    serve(options)


def scheduler_config_command(
    extender_url: Annotated[
        str,
        typer.Option(help="Where kube-scheduler reaches the extender, e.g. https://tidal:8888."),
    ],
    ca_file: Annotated[
        str | None,
        typer.Option(help="CA bundle (path as the scheduler sees it) for an https:// extender."),
    ] = None,
    client_cert: Annotated[
        str | None,
        typer.Option(help="The scheduler's client certificate for the extender (mutual TLS)."),
    ] = None,
    client_key: Annotated[str | None, typer.Option(help="Its private key.")] = None,
    kubeconfig: Annotated[
        str | None, typer.Option(help="The scheduler's kubeconfig path; in-cluster when unset.")
    ] = None,
    leader_elect: Annotated[bool, typer.Option(help="For several scheduler replicas.")] = False,
    qps: Annotated[int, typer.Option(min=1, help="Scheduler client QPS (burst is twice).")] = 5000,
    timeout: Annotated[float, typer.Option(min=0.1, help="Extender call timeout, s.")] = 5.0,
) -> None:
    """Print the KubeSchedulerConfiguration for kube-scheduler with tidal's extender."""
    import yaml  # noqa: PLC0415

    from tidal.scheduler_extender.schedconfig import (  # noqa: PLC0415
        ExtenderConfig,
        scheduler_configuration,
    )

    try:
        extender = ExtenderConfig(
            extender_url,
            ca_file=ca_file,
            cert_file=client_cert,
            key_file=client_key,
            timeout_s=timeout,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    config = scheduler_configuration(
        extender, kubeconfig=kubeconfig, qps=qps, leader_elect=leader_elect
    )
    typer.echo(yaml.safe_dump(config, sort_keys=False), nl=False)


def extender_rbac_command(
    namespace: Annotated[
        str, typer.Option(help="Namespace of the extender's ServiceAccount.")
    ] = "tidal-system",
) -> None:
    """Print the extender's ServiceAccount, least-privilege ClusterRole and binding as YAML."""
    import yaml  # noqa: PLC0415

    from tidal.scheduler_extender.manifests import rbac  # noqa: PLC0415

    typer.echo(yaml.safe_dump_all(rbac(namespace), sort_keys=False), nl=False)

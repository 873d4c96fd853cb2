"""Start the operator: install what it needs (optionally), register the handlers, run kopf."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from tidal.kubeclient import api_client
from tidal.operator.handlers import post_event, register
from tidal.operator.kube import OperatorKube, install
from tidal.operator.metrics import DEFAULT_PORT, OperatorMetrics, serve_metrics
from tidal.operator.reconciler import Reconciler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    kubeconfig: Path | None = None  # in-cluster config when None
    namespaces: tuple[str, ...] = ()  # every namespace when empty
    liveness: str | None = None  # e.g. http://0.0.0.0:8080/healthz
    peering: str | None = None  # a ClusterKopfPeering name for several replicas; else standalone
    install: bool = False  # apply CRDs, PriorityClasses, ClusterRole first
    # PriorityClasses allowed beyond tidal's own (TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES)
    extra_priority_classes: tuple[str, ...] = ()
    metrics_port: int = DEFAULT_PORT  # /metrics on every address; 0: none


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the kubernetes client's: one kubeconfig for both. The client
    keeps a bearer token under "BearerToken" (older releases: "authorization"); asking through
    get_api_key_with_prefix also runs its refresh hook, so a rotated in-cluster token is
    re-read when kopf logs in again after a 401."""
    header = configuration.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    scheme, _, credentials = header.partition(" ")
    token = credentials if scheme.lower() == "bearer" else header
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        token=token.strip() or None,
    )


def build_registry(reconciler: Reconciler, api: client.ApiClient) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry, reconciler)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(api.configuration)

    return registry


def run_operator(options: OperatorOptions) -> None:
    """Run until interrupted (SIGINT/SIGTERM)."""
    api = api_client(options.kubeconfig, pool_size=32)
    if options.install:
        for applied in install(api, extra_priority_classes=options.extra_priority_classes):
            log.info("applied %s", applied)
    metrics = OperatorMetrics()
    if options.metrics_port:
        serve_metrics(metrics, options.metrics_port)
        log.info("serving /metrics on port %d", options.metrics_port)
    reconciler = Reconciler(
        OperatorKube(api),
        on_event=post_event,
        extra_priority_classes=options.extra_priority_classes,
        metrics=metrics,
    )
    kopf.run(
        registry=build_registry(reconciler, api),
        clusterwide=not options.namespaces,
        namespaces=options.namespaces,
        standalone=options.peering is None,
        peering_name=options.peering,
        liveness_endpoint=options.liveness,
    )

"""The local control plane: certificates, configuration files, processes, fake GPU nodes."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tidal.devcluster.binaries import Binaries, DevClusterError, find_binaries
from tidal.devcluster.certs import Pki, make_pki
from tidal.devcluster.nodes import KWOK_SELECTOR, gpu_node
from tidal.devcluster.process import Component, free_port, http_ok, insecure_tls, tail
from tidal.scheduler_extender.schedconfig import (
    BOTH_PROFILES,
    ExtenderConfig,
    scheduler_configuration,
)

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")
STATE_FILE = "state.json"
SERVICE_CIDR = "10.96.0.0/16"
SYSTEM_NS = "tidal-system"  # where tidal's own components' ServiceAccounts live
# Components in start order; stop goes in reverse.
# Popen objects of detached clusters, kept so their finalizers never run while we live.
_DETACHED: list[subprocess.Popen[bytes]] = []
ORDER = (
    "etcd",
    "kube-apiserver",
    "tidal-extender",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "tidal-operator",
)


def node_ready(node: Any) -> bool:
    """Whether a kubernetes.client V1Node has condition Ready=True."""
    conditions = node.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


@dataclass
class ClusterOptions:
    workdir: Path | None = None  # a fresh temporary directory when None
    controller_manager: bool = False  # garbage collection, Jobs, ServiceAccounts
    extender: ExtenderConfig | None = None  # an extender running elsewhere
    run_extender: bool = False  # run `tidal extender` as a component and point the scheduler at it
    run_operator: bool = False  # install the CRDs, run `tidal operator run` as a component
    extender_tls: bool = False  # serve the extender over HTTPS (the apiserver's certificate)
    scheduler_qps: int = 5000  # client-go's 50/100 defaults cap scheduling throughput
    # Scheduler names the cluster's kube-scheduler serves; ("default-scheduler",) leaves
    # tidal-scheduler to a second kube-scheduler (the Helm chart's, in its e2e test).
    scheduler_profiles: tuple[str, ...] = BOTH_PROFILES
    startup_timeout_s: float = 90.0


def scheduler_config(kubeconfig: Path, options: ClusterOptions) -> dict[str, Any]:
    return scheduler_configuration(
        options.extender,
        kubeconfig=str(kubeconfig),
        qps=options.scheduler_qps,
        profiles=options.scheduler_profiles,
    )


def kubeconfig_for(server: str, pki: Pki) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tidal-dev",
                "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "tidal-admin",
                "user": {
                    "client-certificate": str(pki.admin_cert),
                    "client-key": str(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": "tidal-dev", "context": {"cluster": "tidal-dev", "user": "tidal-admin"}}
        ],
        "current-context": "tidal-dev",
    }


@dataclass
class LocalCluster:
    """A running (or startable) control plane. Use as a context manager, or start()/stop()."""

    options: ClusterOptions = field(default_factory=ClusterOptions)
    binaries: Binaries | None = None
    components: dict[str, Component] = field(default_factory=dict)
    workdir: Path = field(init=False)
    _owns_workdir: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.options.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="tidal-cluster-"))
            self._owns_workdir = True
        else:
            self.workdir = self.options.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def server(self) -> str:
        return str(self._state()["server"])

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, on_step: Callable[[str], None] = lambda _: None) -> None:
        binaries = self.binaries or find_binaries()
        started = time.monotonic()
        pki = make_pki(self.workdir / "pki")
        names = ("etcd", "peer", "apiserver", "kcm", "sched", "kwok", "extender", "operator")
        ports = {name: free_port() for name in names}
        if self.options.run_extender:
            scheme = "https" if self.options.extender_tls else "http"
            url = f"{scheme}://127.0.0.1:{ports['extender']}"
            extender = ExtenderConfig(url)
            if self.options.extender_tls:
                extender = ExtenderConfig(
                    url,
                    ca_file=str(pki.ca_cert),
                    cert_file=str(pki.scheduler_client_cert),
                    key_file=str(pki.scheduler_client_key),
                )
            self.options = replace(self.options, extender=extender)
        server = f"https://127.0.0.1:{ports['apiserver']}"
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(server, pki)))
        sched_config = self.workdir / "scheduler-config.yaml"
        sched_config.write_text(yaml.safe_dump(scheduler_config(self.kubeconfig, self.options)))
        api_tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        api_tls.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        specs = self._components(binaries, pki, ports, server, sched_config, api_tls)
        self._write_state(server, ports)
        try:
            for spec in specs:
                on_step(f"starting {spec.name}")
                self.components[spec.name] = spec
                spec.start()
                self._write_state(server, ports)
                spec.wait_healthy(self.options.startup_timeout_s)
        except BaseException:
            self.stop(remove=False)
            raise
        on_step(f"control plane ready in {time.monotonic() - started:.1f} s at {server}")

    def stop(self, *, remove: bool | None = None) -> None:
        """Stop every component (reverse start order). The work directory is removed only when
        this object created it and ``remove`` is not False; logs are kept otherwise."""
        for name in reversed(ORDER):
            component = self.components.get(name)
            if component is not None:
                component.stop()
        if remove if remove is not None else self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, name: str) -> None:
        component = self.components[name]
        component.stop()
        component.start()
        component.wait_healthy(self.options.startup_timeout_s)

    @classmethod
    def attach(cls, workdir: Path) -> LocalCluster:
        """The cluster a previous process started in ``workdir`` (for status and down)."""
        local = cls(ClusterOptions(workdir=workdir))
        state = local._state()
        for name, pid in state["pids"].items():
            local.components[name] = Component(
                name, [], local.log_dir / f"{name}.log", lambda: True, pid=int(pid)
            )
        return local

    def running(self) -> dict[str, bool]:
        """Whether each started component's process is still alive."""
        return {name: c.exited() is None for name, c in self.components.items()}

    def detach(self) -> None:
        """Leave the processes running after this Python process exits (dev-cluster up)."""
        _DETACHED.extend(c.popen for c in self.components.values() if c.popen is not None)
        for component in self.components.values():
            component.popen = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients and nodes ----------------------------------------------------------------
    def api_client(self, pool_size: int = 16) -> Any:
        """A kubernetes.client.ApiClient for the admin user."""
        from kubernetes import client, config  # noqa: PLC0415 - heavy import, only on use

        configuration = client.Configuration()
        config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return client.ApiClient(configuration)

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, bound_pod: dict[str, str] | None = None
    ) -> Path:
        """Write a kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a
        bound token (TokenRequest API, valid a day), so a component runs with exactly its
        RBAC. ``bound_pod`` ({"name", "uid"}) binds the token to that pod, as the kubelet's
        projected token is: it carries the pod's name and uid, and dies with the pod."""
        from kubernetes import client  # noqa: PLC0415

        core = client.CoreV1Api(self.api_client())
        spec: dict[str, Any] = {"expirationSeconds": 86400}
        if bound_pod is not None:
            spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", **bound_pod}
        request = {"spec": spec}
        token = core.create_namespaced_service_account_token(name, namespace, request).status.token
        config = yaml.safe_load(self.kubeconfig.read_text())
        user = f"{namespace}-{name}"
        config["users"] = [{"name": user, "user": {"token": token}}]
        for context in config["contexts"]:
            context["context"]["user"] = user
        path.write_text(yaml.safe_dump(config))
        return path

    def pod_kubeconfig(self, namespace: str, pod: str, path: Path) -> Path:
        """Write a kubeconfig with the credentials a kubelet would mount into pod
        ``namespace/pod``: a token of the pod's ServiceAccount bound to the pod."""
        from kubernetes import client  # noqa: PLC0415

        found = client.CoreV1Api(self.api_client()).read_namespaced_pod(pod, namespace)
        account = found.spec.service_account_name or "default"
        bound = {"name": pod, "uid": found.metadata.uid}
        return self.service_account_kubeconfig(namespace, account, path, bound_pod=bound)

    def create_objects(self, objects: Iterable[dict[str, Any]]) -> None:
        """Create namespaces, ServiceAccounts and RBAC objects; existing ones are kept."""
        from kubernetes import utils  # noqa: PLC0415

        api = self.api_client()
        for obj in objects:
            try:
                utils.create_from_dict(api, obj)
            except utils.FailToCreateError as error:
                if any(getattr(e, "status", None) != 409 for e in error.api_exceptions):
                    raise

    def _run_as_service_account(
        self, name: str, identity: Iterable[dict[str, Any]], path: Path
    ) -> None:
        """Create a component's ServiceAccount and RBAC objects in ``SYSTEM_NS`` and write a
        kubeconfig with a token of that account at ``path``: the e2e tests and benchmarks then
        check that the component's role is enough."""
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}}
        self.create_objects([namespace, *identity])
        self.service_account_kubeconfig(SYSTEM_NS, name, path)

    def _prepare_extender(self, path: Path) -> None:
        from tidal.scheduler_extender.manifests import NAME, rbac  # noqa: PLC0415

        self._run_as_service_account(NAME, rbac(SYSTEM_NS), path)

    def add_gpu_nodes(self, nodes: Iterable[tuple[str, str]], workers: int = 16) -> list[str]:
        """Create (name, preset) KWOK GPU nodes; an existing node of that name is kept."""
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        from kubernetes import client  # noqa: PLC0415
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        api = client.CoreV1Api(self.api_client(pool_size=workers))

        def create(item: tuple[str, str]) -> str:
            name, preset = item
            try:
                api.create_node(gpu_node(name, preset))
            except ApiException as error:
                if error.status != 409:
                    raise
            return name

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(create, list(nodes)))

    def wait_nodes_ready(self, names: Iterable[str], timeout_s: float = 120.0) -> None:
        from kubernetes import client  # noqa: PLC0415

        api = client.CoreV1Api(self.api_client())
        wanted = set(names)
        deadline = time.monotonic() + timeout_s
        while True:
            ready = {
                node.metadata.name
                for node in api.list_node(label_selector="type=kwok").items
                if any(
                    c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
                )
            }
            missing = wanted - ready
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"{len(missing)} nodes not Ready after {timeout_s:.0f} s "
                    f"(e.g. {sorted(missing)[:3]}); kwok log:\n{tail(self.log_dir / 'kwok.log')}"
                )
            time.sleep(0.2)

    def log_report(self, lines: int = 30) -> str:
        parts = [f"logs in {self.log_dir}"]
        for name in ORDER:
            path = self.log_dir / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name} (last {lines} lines) ---\n{tail(path, lines)}")
        return "\n".join(parts)

    # -- state for `tidal dev-cluster status|down` ----------------------------------------
    def _write_state(self, server: str, ports: dict[str, int]) -> None:
        state = {
            "server": server,
            "kubeconfig": str(self.kubeconfig),
            "ports": ports,
            "pids": {n: c.pid for n, c in self.components.items() if c.pid is not None},
            "logs": str(self.log_dir),
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _state(self) -> dict[str, Any]:
        path = self.workdir / STATE_FILE
        if not path.exists():
            raise DevClusterError(
                f"no dev cluster in {self.workdir}; start one with `tidal dev-cluster up`"
            )
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    # -- component command lines ----------------------------------------------------------
    def _components(
        self,
        binaries: Binaries,
        pki: Pki,
        ports: dict[str, int],
        server: str,
        sched_config: Path,
        api_tls: ssl.SSLContext,
    ) -> list[Component]:
        kubeconfig = str(self.kubeconfig)
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['peer']}"
        log = self.log_dir
        auth = [
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
        ]
        components = [
            Component(
                "etcd",
                [
                    str(binaries.path("etcd")),
                    "--name=default",
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--unsafe-no-fsync",
                    "--quota-backend-bytes=8589934592",
                    "--log-level=warn",
                ],
                log / "etcd.log",
                lambda: http_ok(f"{etcd_url}/health"),
            ),
            Component(
                "kube-apiserver",
                [
                    str(binaries.path("kube-apiserver")),
                    f"--etcd-servers={etcd_url}",
                    f"--secure-port={ports['apiserver']}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--client-ca-file={pki.ca_cert}",
                    # Components read this bundle at start; an empty one fills their logs.
                    f"--requestheader-client-ca-file={pki.ca_cert}",
                    f"--tls-cert-file={pki.serving_cert}",
                    f"--tls-private-key-file={pki.serving_key}",
                    "--authorization-mode=RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={pki.sa_public_key}",
                    f"--service-account-signing-key-file={pki.sa_private_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--endpoint-reconciler-type=none",
                    "--allow-privileged=true",
                    "--max-requests-inflight=2000",
                    "--max-mutating-requests-inflight=1000",
                    "--profiling=false",
                    # Without a controller manager nobody creates ServiceAccounts or lifts the
                    # not-ready taint that TaintNodesByCondition puts on every new node.
                    *(
                        []
                        if self.options.controller_manager
                        else ["--disable-admission-plugins=ServiceAccount,TaintNodesByCondition"]
                    ),
                ],
                log / "kube-apiserver.log",
                lambda: http_ok(f"{server}/readyz", api_tls),
            ),
        ]
        extender_url = self.options.extender.url_prefix if self.options.extender else ""
        if self.options.run_extender:
            extender_kubeconfig = self.workdir / "tidal-extender.kubeconfig"
            components.append(
                Component(
                    "tidal-extender",
                    [
                        sys.executable,
                        "-m",
                        "tidal",
                        "extender",
                        f"--kubeconfig={extender_kubeconfig}",
                        f"--port={ports['extender']}",
                        # the apiserver's serving pair is valid for 127.0.0.1 too
                        *(
                            [
                                f"--tls-cert={pki.serving_cert}",
                                f"--tls-key={pki.serving_key}",
                                f"--tls-client-ca={pki.ca_cert}",
                            ]
                            if self.options.extender_tls
                            else []
                        ),
                    ],
                    log / "tidal-extender.log",
                    lambda: http_ok(
                        f"{extender_url}/readyz", api_tls if self.options.extender_tls else None
                    ),
                    prepare=lambda: self._prepare_extender(extender_kubeconfig),
                )
            )
        if self.options.controller_manager:
            components.append(
                Component(
                    "kube-controller-manager",
                    [
                        str(binaries.path("kube-controller-manager")),
                        f"--kubeconfig={kubeconfig}",
                        *auth,
                        f"--secure-port={ports['kcm']}",
                        "--bind-address=127.0.0.1",
                        "--leader-elect=false",
                        f"--service-account-private-key-file={pki.sa_private_key}",
                        f"--root-ca-file={pki.ca_cert}",
                        "--controllers=*,-csrsigning,-nodeipam",
                        "--kube-api-qps=1000",
                        "--kube-api-burst=2000",
                    ],
                    log / "kube-controller-manager.log",
                    lambda: http_ok(f"https://127.0.0.1:{ports['kcm']}/healthz", insecure_tls()),
                )
            )
        components += [
            Component(
                "kube-scheduler",
                [
                    str(binaries.path("kube-scheduler")),
                    f"--config={sched_config}",
                    *auth,
                    f"--secure-port={ports['sched']}",
                    "--bind-address=127.0.0.1",
                    # Benchmarks read /metrics; the port is on 127.0.0.1 only.
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                    "--v=2",
                ],
                log / "kube-scheduler.log",
                lambda: http_ok(f"https://127.0.0.1:{ports['sched']}/healthz", insecure_tls()),
            ),
            Component(
                "kwok",
                [
                    str(binaries.path("kwok")),
                    f"--kubeconfig={kubeconfig}",
                    f"--config={STAGES_FILE}",
                    f"--manage-nodes-with-annotation-selector={KWOK_SELECTOR}",
                    "--node-lease-duration-seconds=40",
                    f"--server-address=127.0.0.1:{ports['kwok']}",
                    "--cidr=10.0.0.1/16",
                    "--node-ip=10.0.0.1",
                ],
                log / "kwok.log",
                lambda: http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"),
            ),
        ]
        if self.options.run_operator:
            components.append(self._operator(ports["operator"]))
        return components

    def _operator(self, port: int) -> Component:
        liveness = f"http://127.0.0.1:{port}/healthz"
        kubeconfig = self.workdir / "tidal-operator.kubeconfig"
        return Component(
            "tidal-operator",
            [
                sys.executable,
                "-m",
                "tidal",
                "operator",
                "run",
                f"--kubeconfig={kubeconfig}",
                f"--liveness={liveness}",
                # a port of its own: two dev clusters (or a test's) on one machine must not clash
                f"--metrics-port={free_port()}",
            ],
            self.log_dir / "tidal-operator.log",
            lambda: http_ok(liveness),
            prepare=lambda: self._prepare_operator(kubeconfig),
        )

    def _prepare_operator(self, path: Path) -> None:
        """As an administrator would (``tidal operator install-crds``): the CRDs,
        PriorityClasses and the operator's ClusterRole first; the operator runs without them."""
        from tidal.operator.kube import install  # noqa: PLC0415
        from tidal.operator.manifests import OPERATOR, operator_identity  # noqa: PLC0415

        install(self.api_client())
        self._run_as_service_account(OPERATOR, operator_identity(SYSTEM_NS), path)

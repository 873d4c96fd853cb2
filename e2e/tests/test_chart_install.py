"""The Helm chart (charts/tidal) on the real control plane: server-side dry runs, `helm install
--wait` with ci/dev-cluster.yaml, then the chart's components run as local processes configured
from what the release put on the server (the tidal-scheduler ConfigMap, the Deployments' and the
DaemonSet's commands and env) and authenticated as the chart's ServiceAccounts, so its RBAC is
what they get. They schedule a GPU pod and an LLMService onto NVLink quads and publish a
GPUTopology, and no request of theirs is denied. Then `helm upgrade` changes a CRD on the server
and `helm uninstall` leaves the CRDs and the workloads.

KWOK marks the release's pods Running without running them (the image is not built here); the
local processes stand in for their containers. The cluster's own kube-scheduler serves only
default-scheduler (it places the release's pods), so tidal-scheduler is the chart's alone.
Nodes: two DGX-1V (NVLink quads {0,1,2,3} and {4,5,6,7}).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.helpers import binaries_or_skip, fresh_namespace, wait_for
from tests.kubelet_double import KubeletDouble
from tidal import api as tidal_api
from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.binaries import Binaries
from tidal.devcluster.nodes import gpu_pod, node_names
from tidal.devcluster.process import Component, free_port, http_ok, insecure_tls, tail
from tidal.scheduler_extender.schedconfig import DEFAULT_SCHEDULER

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "tidal"
VALUES = CHART / "ci" / "dev-cluster.yaml"
EXAMPLES = ROOT / "examples"
RELEASE, NAMESPACE = "tidal", "tidal-system"
NODES = node_names(2, ["dgx1-v100"], prefix="chart")
GROUP, VERSION = tidal_api.GROUP, tidal_api.VERSION
CRDS = ("llmservices.tidal.dev", "llmbatchjobs.tidal.dev", "gputopologies.tidal.dev")
QUADS = ({0, 1, 2, 3}, {4, 5, 6, 7})
NVLINK = {"tidal.dev/topology-mode": "guaranteed", "tidal.dev/topology-tier": "nvlink"}
EXTRA_CLASS = "research-low"  # the upgrade's operator.allowedPriorityClasses
# RBAC's refusal (in any quoting: klog, kopf, JSON logs) and a 401
DENIED = re.compile(r"forbidden: User\b|\bUnauthorized\b")


# -- the cluster and its tools --------------------------------------------------------------


@pytest.fixture(scope="module")
def chart_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        ClusterOptions(
            workdir=tmp_path_factory.mktemp("chart-cluster"),
            controller_manager=True,
            scheduler_profiles=(DEFAULT_SCHEDULER,),  # tidal-scheduler is the chart's
        ),
        binaries_or_skip(),
    )
    try:
        local.start()
        local.wait_nodes_ready(local.add_gpu_nodes(NODES))
        local.create_objects(
            [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
        )
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster(chart_cluster: LocalCluster) -> LocalCluster:
    """Named `cluster` so a failure report carries the control-plane logs."""
    return chart_cluster


@pytest.fixture
def ns(core: Any) -> Iterator[str]:
    yield from fresh_namespace(core, "chart")


def run_tool(
    cluster: LocalCluster, name: str, *args: str | Path, stdin: str = "", timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    """helm or kubectl against the cluster (helm's own state under the cluster's workdir)."""
    binaries = cluster.binaries
    assert isinstance(binaries, Binaries)
    helm_home = cluster.workdir / "helm"
    env = {
        **os.environ,
        **{
            f"HELM_{part}_HOME": str(helm_home / part.lower())
            for part in ("CACHE", "CONFIG", "DATA")
        },
    }
    return subprocess.run(
        [str(binaries.path(name)), f"--kubeconfig={cluster.kubeconfig}", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )


def helm(cluster: LocalCluster, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_tool(cluster, "helm", *args)


def kubectl(
    cluster: LocalCluster, *args: str | Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_tool(cluster, "kubectl", *args, stdin=stdin)


CHART_ARGS = (RELEASE, CHART, "-n", NAMESPACE, "-f", VALUES)


@pytest.fixture(scope="module")
def dry_runs(chart_cluster: LocalCluster) -> dict[str, subprocess.CompletedProcess[str]]:
    """Before anything is installed: the rendered objects through the API server's admission
    (`kubectl apply --server-side --dry-run=server`), and `helm install --dry-run=server`."""
    template = helm(chart_cluster, "template", *CHART_ARGS)
    assert template.returncode == 0, template.stderr
    applied = kubectl(
        chart_cluster,
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        stdin=template.stdout,
    )
    installed = helm(chart_cluster, "install", *CHART_ARGS, "--dry-run=server")
    return {"template": template, "apply": applied, "install": installed}


@pytest.fixture(scope="module")
def release(
    chart_cluster: LocalCluster, dry_runs: dict[str, subprocess.CompletedProcess[str]]
) -> subprocess.CompletedProcess[str]:
    """`helm install --wait` of the chart with ci/dev-cluster.yaml (after the dry runs)."""
    result = helm(chart_cluster, "install", *CHART_ARGS, "--wait", "--timeout=120s")
    assert result.returncode == 0, result.stderr
    return result


# -- what the release put on the server -----------------------------------------------------


def server_dict(cluster: LocalCluster, obj: Any) -> dict[str, Any]:
    """A kubernetes client object as the API's JSON (camelCase keys)."""
    data: dict[str, Any] = cluster.api_client().sanitize_for_serialization(obj)
    return data


def workload(cluster: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    apps = client.AppsV1Api(cluster.api_client())
    read = (
        apps.read_namespaced_deployment if kind == "Deployment" else apps.read_namespaced_daemon_set
    )
    return server_dict(cluster, read(name, NAMESPACE))


def available(cluster: LocalCluster, replicas: int) -> bool:
    """Whether Deployments tidal-operator and tidal-scheduler have ``replicas`` available."""
    return all(
        workload(cluster, "Deployment", name)["status"].get("availableReplicas") == replicas
        for name in ("tidal-operator", "tidal-scheduler")
    )


def container_of(obj: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def command_of(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def local_tidal(argv: list[str]) -> list[str]:
    """The image's entrypoint `tidal` is this interpreter's `python -m tidal` here."""
    assert argv[0] == "tidal", argv
    return [sys.executable, "-m", "tidal", *argv[1:]]


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with its one ``flag=...`` set to ``flag=value`` (the chart must pass it)."""
    hits = [i for i, arg in enumerate(argv) if arg.startswith(f"{flag}=")]
    assert len(hits) == 1, f"{flag} in {argv}"
    return [f"{flag}={value}" if i == hits[0] else arg for i, arg in enumerate(argv)]


def flag_value(argv: list[str], flag: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{flag}=")]
    return value


def env_of(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's env, its downward-API fields (fieldRef.fieldPath) taken from ``fields``;
    any other valueFrom fails, so a new kind of env in the chart gets looked at here."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in fields, f"env {item['name']} from {item['valueFrom']}"
            env[item["name"]] = fields[path]
    return env


# -- the chart's components as local processes ----------------------------------------------


@dataclass
class Components:
    """Local processes standing in for the release's containers (and the agent's kubelet)."""

    processes: list[Component] = field(default_factory=list)
    kubelet: KubeletDouble | None = None
    agent_node: str = ""
    agent_preset: str = ""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if self.kubelet is not None and self.kubelet.server is not None:
            self.kubelet.server.stop(0)
            self.kubelet.server = None

    def log(self, name: str) -> str:
        (process,) = [p for p in self.processes if p.name == name]
        return process.log.read_text(errors="replace")

    def report(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{tail(p.log, 30)}" for p in self.processes)

    def wait(self, probe: Any, what: str, timeout_s: float = 60) -> Any:
        """wait_for, with the components' log tails when it times out."""
        try:
            return wait_for(probe, what, timeout_s)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.report()}") from None


def account_kubeconfig(cluster: LocalCluster, obj: dict[str, Any]) -> Path:
    """A kubeconfig with a token of the workload's own ServiceAccount, as the kubelet mounts."""
    account = obj["spec"]["template"]["spec"]["serviceAccountName"]
    path = cluster.workdir / f"chart-{account}.kubeconfig"
    return cluster.service_account_kubeconfig(NAMESPACE, account, path)


def extender_url(deployment: dict[str, Any]) -> str:
    """Where the extender sidecar listens, from its --host and --port."""
    argv = command_of(container_of(deployment, "extender"))
    return f"http://{flag_value(argv, '--host')}:{flag_value(argv, '--port')}"


def kube_scheduler_process(
    cluster: LocalCluster, name: str, kubeconfig: Path, extender_port: int
) -> Component:
    """kube-scheduler as Deployment tidal-scheduler runs it, with ConfigMap
    tidal-scheduler-config's configuration, its extender on ``extender_port``."""
    binaries = cluster.binaries
    assert isinstance(binaries, Binaries)
    deployment = workload(cluster, "Deployment", "tidal-scheduler")
    scheduler = container_of(deployment, "kube-scheduler")
    argv = command_of(scheduler)
    assert argv[0] == "kube-scheduler", argv
    # --config is the ConfigMap's key in the container's config mount
    (mount,) = [m for m in scheduler["volumeMounts"] if m["name"] == "config"]
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    ]
    assert volume["configMap"]["name"] == "tidal-scheduler-config"
    assert flag_value(argv, "--config") == f"{mount['mountPath']}/config.yaml"
    configmap = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(
        "tidal-scheduler-config", NAMESPACE
    )
    config = yaml.safe_load(configmap.data["config.yaml"])
    assert [p["schedulerName"] for p in config["profiles"]] == [tidal_api.SCHEDULER_NAME]
    (entry,) = config["extenders"]
    assert entry["urlPrefix"] == extender_url(deployment), "it calls the extender where it listens"
    entry["urlPrefix"] = f"http://127.0.0.1:{extender_port}"
    assert "kubeconfig" not in config["clientConnection"]  # in-cluster in the pod
    config["clientConnection"]["kubeconfig"] = str(kubeconfig)
    config_path = cluster.workdir / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    secure = free_port()
    argv = with_flag(with_flag(argv, "--config", str(config_path)), "--secure-port", str(secure))
    argv = [
        str(binaries.path("kube-scheduler")),
        *argv[1:],
        # in the pod these come from the in-cluster config
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
    ]
    return Component(
        name,
        argv,
        cluster.log_dir / f"{name}.log",
        lambda: http_ok(f"https://127.0.0.1:{secure}/healthz", insecure_tls()),
    )


def scheduler_processes(cluster: LocalCluster) -> list[Component]:
    """The extender sidecar and kube-scheduler of Deployment tidal-scheduler, on free ports,
    as its ServiceAccount."""
    deployment = workload(cluster, "Deployment", "tidal-scheduler")
    kubeconfig = account_kubeconfig(cluster, deployment)
    extender = container_of(deployment, "extender")
    port, health = free_port(), free_port()
    argv = with_flag(
        with_flag(command_of(extender), "--port", str(port)), "--health-port", str(health)
    )
    return [
        Component(
            "tidal-extender",  # a name in LocalCluster's ORDER: failure reports carry its log
            local_tidal(argv),
            cluster.log_dir / "tidal-extender.log",
            lambda: http_ok(f"http://127.0.0.1:{health}/readyz"),
            env={**env_of(extender, {}), "KUBECONFIG": str(kubeconfig)},
        ),
        kube_scheduler_process(cluster, "chart-kube-scheduler", kubeconfig, port),
    ]


def operator_process(cluster: LocalCluster, name: str = "tidal-operator") -> Component:
    """Deployment tidal-operator's container, its ports free ones, POD_ID ``name``."""
    deployment = workload(cluster, "Deployment", "tidal-operator")
    container = container_of(deployment, "operator")
    argv = command_of(container)
    liveness = urllib.parse.urlsplit(flag_value(argv, "--liveness"))
    port = free_port()
    argv = with_flag(
        argv, "--liveness", liveness._replace(netloc=f"{liveness.hostname}:{port}").geturl()
    )
    env = env_of(container, {"metadata.name": name})
    # /metrics (default 9403): a free port too, wherever the chart sets it
    metrics = str(free_port())
    if any(arg.startswith("--metrics-port=") for arg in argv):
        argv = with_flag(argv, "--metrics-port", metrics)
    env["TIDAL_OPERATOR_METRICS_PORT"] = metrics
    return Component(
        name,
        local_tidal(argv),
        cluster.log_dir / f"{name}.log",
        lambda: http_ok(f"http://127.0.0.1:{port}{liveness.path}"),
        env={**env, "KUBECONFIG": str(account_kubeconfig(cluster, deployment))},
    )


def agent_process(cluster: LocalCluster, node: str, preset: str, plugin_dir: Path) -> Component:
    daemon_set = workload(cluster, "DaemonSet", "tidal-node-agent")
    container = container_of(daemon_set, "node-agent")
    env = env_of(container, {"spec.nodeName": node})
    assert env["TIDAL_DEVICE_PLUGIN_DIR"] == "/var/lib/kubelet/device-plugins"
    port = free_port()
    env |= {
        "TIDAL_DEVICE_PLUGIN_DIR": str(plugin_dir),
        "TIDAL_NODE_AGENT_METRICS_PORT": str(port),
        "KUBECONFIG": str(account_kubeconfig(cluster, daemon_set)),
    }
    return Component(
        "chart-node-agent",
        local_tidal([*command_of(container), "--fake", preset]),  # no NVML here
        cluster.log_dir / "chart-node-agent.log",
        lambda: http_ok(f"http://127.0.0.1:{port}/metrics"),
        env=env,
    )


@pytest.fixture(scope="module")
def components(chart_cluster: LocalCluster, release: Any) -> Iterator[Components]:
    node = NODES[0][0]
    preset = (
        client.CoreV1Api(chart_cluster.api_client())
        .read_node(node)
        .metadata.labels[tidal_api.LABEL_TOPOLOGY_PRESET]
    )
    # unix socket paths must stay short: a directory under /tmp, not pytest's
    plugin_dir = Path(tempfile.mkdtemp(prefix="tidal-dp-"))
    kubelet = KubeletDouble(plugin_dir)  # the agent's device plugin registers with it
    started = Components(kubelet=kubelet, agent_node=node, agent_preset=preset)
    try:
        kubelet.start()
        processes = [
            *scheduler_processes(chart_cluster),
            operator_process(chart_cluster),
            agent_process(chart_cluster, node, preset, plugin_dir),
        ]
        for process in processes:
            started.processes.append(process)
            process.start()
        for process in processes:
            process.wait_healthy(90)
        yield started
    finally:
        started.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)


# -- install --------------------------------------------------------------------------------


def test_server_side_dry_runs_accept_the_chart(
    dry_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    rendered = [d for d in yaml.safe_load_all(dry_runs["template"].stdout) if d]
    applied = dry_runs["apply"]
    assert applied.returncode == 0, applied.stderr
    lines = [line for line in applied.stdout.splitlines() if line.strip()]
    assert len(lines) == len(rendered), applied.stdout
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), (
        applied.stdout
    )
    installed = dry_runs["install"]
    assert installed.returncode == 0, installed.stderr
    assert "STATUS: pending-install" in installed.stdout


def test_install_waits_for_every_component(
    cluster: LocalCluster, release: subprocess.CompletedProcess[str]
) -> None:
    status = helm(cluster, "status", RELEASE, "-n", NAMESPACE, "-o", "json")
    assert json.loads(status.stdout)["info"]["status"] == "deployed"
    assert "kubectl apply -f examples/llmservice.yaml" in release.stdout  # NOTES.txt
    # helm's --wait counts ready pods (of a DaemonSet, all but maxUnavailable); the workloads'
    # own status follows
    wait_for(lambda: available(cluster, 1), "both Deployments available")

    def agents_ready() -> dict[str, Any] | None:
        status: dict[str, Any] = workload(cluster, "DaemonSet", "tidal-node-agent")["status"]
        return status if status.get("numberReady") == status["desiredNumberScheduled"] else None

    agents = wait_for(agents_ready, "the node agents ready")
    assert agents["desiredNumberScheduled"] == len(NODES)  # on each KWOK node (ci/dev-cluster.yaml)
    extensions = client.ApiextensionsV1Api(cluster.api_client())
    for name in CRDS:
        conditions = extensions.read_custom_resource_definition(name).status.conditions
        assert {c.type: c.status for c in conditions}["Established"] == "True", name
    scheduling = client.SchedulingV1Api(cluster.api_client())
    online = scheduling.read_priority_class(tidal_api.PRIORITY_CLASS_ONLINE)
    assert online.value == 1000000
    assert online.preemption_policy == "PreemptLowerPriority"
    assert (
        scheduling.read_priority_class(tidal_api.PRIORITY_CLASS_BATCH).preemption_policy == "Never"
    )


def test_the_examples_are_accepted_by_the_installed_crds(
    cluster: LocalCluster, release: Any, ns: str
) -> None:
    examples = ("-f", EXAMPLES / "llmservice.yaml", "-f", EXAMPLES / "llmbatchjob.yaml")
    result = kubectl(cluster, "apply", "--dry-run=server", "-n", ns, *examples)
    assert result.returncode == 0, result.stderr


# -- the components, with the chart's identities --------------------------------------------


def gpus_of(pod: Any) -> set[int]:
    return set(tidal_api.parse_gpu_list(pod.metadata.annotations[tidal_api.ANNOTATION_GPUS]))


def test_the_chart_scheduler_binds_a_gpu_pod_to_an_nvlink_quad(
    components: Components, core: Any, ns: str
) -> None:
    core.create_namespaced_pod(ns, gpu_pod("quad", 4, annotations=NVLINK))

    def bound() -> Any:
        pod = core.read_namespaced_pod("quad", ns)
        notes = pod.metadata.annotations or {}
        return pod if pod.spec.node_name and tidal_api.ANNOTATION_GPUS in notes else None

    pod = components.wait(bound, "pod quad bound with tidal.dev/gpus")
    assert pod.spec.node_name in {name for name, _ in NODES}
    assert gpus_of(pod) in QUADS
    assert pod.metadata.annotations[tidal_api.ANNOTATION_TOPOLOGY_ACHIEVED] == "nvlink"
    # by the chart's kube-scheduler (the cluster's serves default-scheduler only)
    assert f'"Successfully bound pod to node" pod="{ns}/quad"' in components.log(
        "chart-kube-scheduler"
    )


def service(name: str, tp: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": tidal_api.API_VERSION,
        "kind": tidal_api.KIND_LLMSERVICE,
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "llama-70b", "uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
            "tensorParallel": tp,
            "replicas": 1,
            "resources": {"cpu": "1", "memory": "1Gi"},
            **spec,
        },
    }


def service_pods(core: Any, ns: str, name: str) -> list[Any]:
    selector = f"{tidal_api.LABEL_LLMSERVICE}={name}"
    return list(core.list_namespaced_pod(ns, label_selector=selector).items)


def test_the_chart_operator_places_an_llmservice_on_an_aligned_quad(
    components: Components, core: Any, custom: Any, ns: str
) -> None:
    body = service("chat", 4, topology={"mode": "guaranteed", "tier": "nvlink"})
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", body)

    def ready() -> Any:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", "chat")
        return obj if (obj.get("status") or {}).get("readyReplicas") == 1 else None

    obj = components.wait(ready, "LLMService chat to have 1 ready replica", 90)
    (pod,) = service_pods(core, ns, "chat")
    assert pod.spec.scheduler_name == tidal_api.SCHEDULER_NAME
    assert pod.spec.service_account_name == tidal_api.WORKER_SERVICE_ACCOUNT  # made by the operator
    assert gpus_of(pod) in QUADS
    placement = obj["status"]["placements"][0]
    assert placement["node"] == pod.spec.node_name
    assert placement["tier"] == "nvlink"


def test_the_chart_node_agent_publishes_its_nodes_gputopology_and_registers(
    components: Components, core: Any, custom: Any
) -> None:
    node = components.agent_node

    def published() -> Any:
        try:
            obj = custom.get_cluster_custom_object(GROUP, VERSION, "gputopologies", node)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return obj if obj.get("status") else None

    topology = components.wait(published, f"GPUTopology {node} with a status")
    assert topology["metadata"]["ownerReferences"][0]["uid"] == core.read_node(node).metadata.uid
    assert topology["spec"]["name"] == topology["status"]["preset"] == components.agent_preset
    assert topology["status"]["healthyGPUs"] == "0,1,2,3,4,5,6,7"
    labels = core.read_node(node).metadata.labels
    assert labels[tidal_api.LABEL_TOPOLOGY_CLASS] == "nvlink"  # the agent patched its node
    registered = components.kubelet
    assert registered is not None
    assert registered.registered.wait(30), components.report()
    assert [r.resource_name for r in registered.requests] == [tidal_api.GPU_RESOURCE]


def test_no_component_was_denied_anything(components: Components) -> None:
    """After the tests above (file order): no request of any component was refused by RBAC
    (the authorizer's "... is forbidden: User ... cannot ...") or unauthenticated, so the
    chart's roles cover what they do; and each still runs. (A 403 for a terminating namespace,
    as when a test's namespace goes, is not RBAC's.)"""
    for process in components.processes:
        assert process.exited() is None, f"{process.name} exited\n{tail(process.log)}"
        lines = process.log.read_text(errors="replace").splitlines()
        denied = [line for line in lines if DENIED.search(line)]
        assert not denied, f"{process.name}: {denied[:5]}"


# -- upgrade and uninstall ------------------------------------------------------------------


def service_classes(cluster: LocalCluster) -> list[str]:
    """The priorityClassName enum of the LLMService CRD the API server holds."""
    extensions = client.ApiextensionsV1Api(cluster.api_client())
    crd = server_dict(cluster, extensions.read_custom_resource_definition(CRDS[0]))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    enum: list[str] = spec["properties"]["priorityClassName"]["enum"]
    return enum


def test_upgrade_changes_the_crds_on_the_server(
    cluster: LocalCluster, release: Any, ns: str
) -> None:
    research = yaml.safe_dump(service("research", 1, priorityClassName=EXTRA_CLASS))
    refused = kubectl(cluster, "apply", "--dry-run=server", "-n", ns, "-f", "-", stdin=research)
    assert refused.returncode != 0
    assert f'spec.priorityClassName: Unsupported value: "{EXTRA_CLASS}"' in refused.stderr
    assert EXTRA_CLASS not in service_classes(cluster)

    extra = f"operator.allowedPriorityClasses={{{EXTRA_CLASS}}}"  # helm's list syntax
    upgrade = helm(cluster, "upgrade", *CHART_ARGS, "--set", extra, "--wait", "--timeout=120s")
    assert upgrade.returncode == 0, upgrade.stderr
    assert service_classes(cluster) == ["tidal-online", "tidal-batch", EXTRA_CLASS]
    operator = container_of(workload(cluster, "Deployment", "tidal-operator"), "operator")
    assert (
        env_of(operator, {"metadata.name": "-"})["TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES"]
        == EXTRA_CLASS
    )

    def accepted() -> Any:
        result = kubectl(cluster, "apply", "--dry-run=server", "-n", ns, "-f", "-", stdin=research)
        return result if result.returncode == 0 else None

    wait_for(accepted, f"the API server to accept priorityClassName {EXTRA_CLASS}", 30, 1)
    history = json.loads(helm(cluster, "history", RELEASE, "-n", NAMESPACE, "-o", "json").stdout)
    assert [(r["revision"], r["status"]) for r in history] == [(1, "superseded"), (2, "deployed")]


def test_uninstall_keeps_the_crds_and_the_workloads(
    cluster: LocalCluster, release: Any, components: Components, core: Any, custom: Any, ns: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", service("kept", 1))
    components.wait(lambda: service_pods(core, ns, "kept"), "the operator to create kept's pod")
    components.stop()  # as their pods go with the release: nothing of theirs runs without RBAC

    result = helm(cluster, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=120s")
    assert result.returncode == 0, result.stderr
    assert "kept due to the resource policy" in result.stdout
    assert helm(cluster, "status", RELEASE, "-n", NAMESPACE).returncode != 0
    extensions = client.ApiextensionsV1Api(cluster.api_client())
    for name in CRDS:
        assert extensions.read_custom_resource_definition(name).metadata.deletion_timestamp is None
    kept = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", "kept")
    assert kept["metadata"].get("deletionTimestamp") is None
    assert service_pods(core, ns, "kept")
    assert custom.get_cluster_custom_object(GROUP, VERSION, "gputopologies", components.agent_node)
    # the release's own objects are gone
    apps = client.AppsV1Api(cluster.api_client())
    wait_for(
        lambda: (
            not apps.list_namespaced_deployment(NAMESPACE).items
            and not apps.list_namespaced_daemon_set(NAMESPACE).items
        ),
        "the release's Deployments and DaemonSet to be deleted",
    )
    roles = client.RbacAuthorizationV1Api(cluster.api_client()).list_cluster_role().items
    assert not [r.metadata.name for r in roles if r.metadata.name.startswith("tidal-")]


def one_operator_works_then_hands_over(
    processes: Components, custom: Any, core: Any, ns: str
) -> Component:
    """Both operators join ClusterKopfPeering tidal-operator, exactly one reconciles, and when
    it stops the other takes over; returns the one stopped."""
    peering = ("kopf.dev", "v1", "clusterkopfpeerings", "tidal-operator")

    def both_peers() -> Any:
        status = custom.get_cluster_custom_object(*peering).get("status") or {}
        return status if {"operator-a", "operator-b"} <= set(status) else None

    processes.wait(both_peers, "both operators in ClusterKopfPeering tidal-operator")
    # Each replica draws its own peering priority: one works, the other stays paused in
    # its favour (equal priorities would pause both, and nothing would be reconciled).
    # kopf starts every replica paused and logs "Resuming" when it finds itself the
    # highest live peer; the lower one logs "Pausing" only if it had been working first.
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "llmservices", service("ha", 1))
    processes.wait(lambda: service_pods(core, ns, "ha"), "the active operator to make a pod")
    operators = ("operator-a", "operator-b")

    def working(name: str) -> bool:
        log = processes.log(name)
        return log.rfind("Resuming operations after the pause") > log.rfind("Pausing")

    active = [name for name in operators if working(name)]
    assert len(active) == 1, active
    (standby,) = set(operators) - set(active)
    assert "created pod" not in processes.log(standby)
    # Failover: the active replica leaves the peering on SIGTERM, the standby takes over.
    (leaving,) = [p for p in processes.processes if p.name == active[0]]
    leaving.stop()
    processes.wait(lambda: working(standby), f"{standby} to resume after {active[0]} left")
    return leaving


def test_reinstall_with_two_replicas_elects_a_scheduler_and_peers_the_operators(
    cluster: LocalCluster, core: Any, custom: Any, ns: str
) -> None:
    """ci/replicas-2.yaml after an uninstall: the kept CRDs are adopted, two kube-schedulers
    elect a leader through Lease tidal-scheduler and two operators meet in ClusterKopfPeering
    tidal-operator, all as the chart's ServiceAccounts and without a denial."""
    if helm(cluster, "status", RELEASE, "-n", NAMESPACE).returncode == 0:  # run on its own
        assert helm(cluster, "uninstall", RELEASE, "-n", NAMESPACE, "--wait").returncode == 0
    result = helm(
        cluster, "install", *CHART_ARGS, "-f", CHART / "ci" / "replicas-2.yaml", "--wait",
        "--timeout=120s",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wait_for(lambda: available(cluster, 2), "both Deployments available with 2 replicas")
    peering = ("kopf.dev", "v1", "clusterkopfpeerings", "tidal-operator")
    custom.get_cluster_custom_object(*peering)  # the post-install hook, after its CRD

    deployment = workload(cluster, "Deployment", "tidal-scheduler")
    kubeconfig = account_kubeconfig(cluster, deployment)
    processes = Components()
    try:
        for name in ("scheduler-a", "scheduler-b"):
            process = kube_scheduler_process(cluster, name, kubeconfig, free_port())
            processes.processes.append(process)
            process.start()
        for name in ("operator-a", "operator-b"):
            process = operator_process(cluster, name)
            processes.processes.append(process)
            process.start()
        for process in processes.processes:
            process.wait_healthy(90)
        coordination = client.CoordinationV1Api(cluster.api_client())

        def renewed() -> Any:
            lease = coordination.read_namespaced_lease("tidal-scheduler", NAMESPACE).spec
            held = lease.holder_identity and lease.renew_time and lease.acquire_time
            return lease if held and lease.renew_time > lease.acquire_time else None

        processes.wait(renewed, "Lease tidal-scheduler held and renewed")
        acquired = [
            name
            for name in ("scheduler-a", "scheduler-b")
            if f"successfully acquired lease {NAMESPACE}/tidal-scheduler" in processes.log(name)
        ]
        assert len(acquired) == 1, acquired
        (follower,) = {"scheduler-a", "scheduler-b"} - set(acquired)
        processes.wait(
            lambda: processes.log(follower).count("attempting to acquire leader lease") >= 1,
            f"{follower} to try for the lease",
        )

        leaving = one_operator_works_then_hands_over(processes, custom, core, ns)
        assert not any(
            "Pausing all operators, including self" in processes.log(name)
            for name in ("operator-a", "operator-b")
        )
        for process in processes.processes:
            if process is not leaving:
                assert process.exited() is None, f"{process.name} exited\n{tail(process.log)}"
            denied = [
                line for line in processes.log(process.name).splitlines() if DENIED.search(line)
            ]
            assert not denied, f"{process.name}: {denied[:5]}"
    finally:
        processes.stop()

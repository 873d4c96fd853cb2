"""The Helm chart (charts/tidal): its generated parts are current, `helm lint --strict` passes,
its renders hold the objects each toggle asks for with the Python's CRDs, rules, DaemonSet and
scheduler configuration, every container is locked down, the schema and validate.yaml refuse
bad values naming them, the real kube-scheduler accepts the configuration, and every render
passes kubernetes-validate --strict.

helm and kube-scheduler come from the dev cluster's binary cache (`make e2e-binaries`). Without
them the tests that need them skip, unless TIDAL_E2E=require (CI), which makes that a failure.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import generate_latest
from typer.testing import CliRunner

from tidal import __version__
from tidal.chartgen import (
    GENERATED,
    stale_files,
    value_docs,
    write_files,
)
from tidal.cli import app
from tidal.devcluster.binaries import K8S_VERSION, default_binaries
from tidal.devcluster.certs import make_pki
from tidal.node_agent import manifests as agent
from tidal.node_agent.backend import open_backend
from tidal.node_agent.metrics import AgentMetrics
from tidal.operator import manifests as operator
from tidal.operator.crds import DEFAULT_IMAGE, custom_resource_definitions
from tidal.scheduler_extender import manifests as extender
from tidal.scheduler_extender.metrics import ExtenderMetrics
from tidal.scheduler_extender.schedconfig import (
    SECOND_SCHEDULER,
    ExtenderConfig,
    scheduler_configuration,
)

CHART = Path(__file__).resolve().parents[1] / "charts" / "tidal"
NAMESPACE = "tidal-system"
IMAGE = f"ghcr.io/tidal-llm/tidal:{__version__}"
MONITORING = ["ServiceMonitor", "PodMonitor", "PrometheusRule"]
EVERY_API = [f"monitoring.coreos.com/v1/{kind}" for kind in MONITORING]
EVERY_API.append("cert-manager.io/v1/Certificate")
CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
# Every ci/*.yaml, rendered as the test matrix (with every optional API present).
CASES = ["defaults", *(name.removesuffix(".yaml") for name in CI_FILES if name != "defaults.yaml")]
HARDENED = {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
LOCKED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


# -- binaries and rendering -----------------------------------------------------------------


def tool(name: str) -> Path:
    path = default_binaries().path(name)
    if os.access(path, os.X_OK):
        return path
    message = f"{name} not found at {path}: build it with `make e2e-binaries`"
    if os.environ.get("TIDAL_E2E") == "require":
        pytest.fail(message)
    pytest.skip(message)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(tool("helm")), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def template_args(
    files: tuple[str, ...],
    sets: tuple[str, ...],
    apis: tuple[str, ...],
    kube_version: str,
    namespace: str = NAMESPACE,
) -> list[str]:
    args = ["template", "tidal", str(CHART), "-n", namespace, "--kube-version", kube_version]
    for name in files:
        args += ["-f", str(CHART / "ci" / name)]
    for item in sets:
        args += ["--set", item]
    for api in apis:
        args += ["--api-versions", api]
    return args


@functools.cache
def _render(
    files: tuple[str, ...], sets: tuple[str, ...], apis: tuple[str, ...], kube_version: str
) -> tuple[dict[str, Any], ...]:
    result = helm(*template_args(files, sets, apis, kube_version))
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(
    *files: str,
    sets: tuple[str, ...] = (),
    apis: tuple[str, ...] = tuple(EVERY_API),
    kube_version: str = K8S_VERSION,
) -> list[dict[str, Any]]:
    """The objects `helm template` renders from the ci/ ``files`` and ``--set`` items."""
    return [dict(d) for d in _render(files, sets, apis, kube_version)]


def render_case(case: str, *sets: str) -> list[dict[str, Any]]:
    return render(*(() if case == "defaults" else (f"{case}.yaml",)), sets=sets)


def refused(*sets: str, namespace: str = NAMESPACE, apis: tuple[str, ...] = ()) -> str:
    """helm template's error output for values it must refuse."""
    result = helm(*template_args((), tuple(sets), apis, K8S_VERSION, namespace))
    assert result.returncode != 0, f"helm accepted {sets}"
    return result.stderr


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def names(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = ("Deployment", "DaemonSet")
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in kinds}


def container(objects: list[dict[str, Any]], workload: str, name: str) -> dict[str, Any]:
    spec = pod_specs(objects)[workload]["spec"]
    found: dict[str, Any] = next(c for c in spec["containers"] if c["name"] == name)
    return found


def without_chart_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with metadata reduced to its name (the chart adds labels and annotations)."""
    return {**obj, "metadata": {"name": obj["metadata"]["name"]}}


def scheduler_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = one(objects, "ConfigMap", "tidal-scheduler-config")
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["config.yaml"])
    return config


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = re.fullmatch(r"([0-9.]+)(ms|s|m|h)", duration).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def with_seconds(config: dict[str, Any]) -> dict[str, Any]:
    """Extender timeouts as seconds: Python writes 5.0s, the chart its value (5s)."""
    for entry in config.get("extenders", []):
        entry["httpTimeout"] = seconds(entry["httpTimeout"])
    return config


# -- generated parts ------------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    stale = stale_files(CHART)
    assert not stale, f"stale generated chart files {stale}: run `make chart`"


def test_a_stale_or_orphaned_generated_file_is_found_and_rewritten(tmp_path: Path) -> None:
    chart = tmp_path / "tidal"
    shutil.copytree(CHART, chart)
    role = chart / "templates" / "operator" / "clusterrole.yaml"
    role.write_text(role.read_text().replace("- watch", "- watch\n      - delete", 1))
    orphan = chart / "templates" / "crds" / "old.tidal.dev.yaml"
    orphan.write_text("{{- /* " + GENERATED.format(source="x") + " */ -}}\n")
    (chart / "values.yaml").write_text(
        (chart / "values.yaml").read_text().replace("Operator log level.", "How loud.")
    )
    expected = [
        "README.md",
        "templates/crds/old.tidal.dev.yaml",
        "templates/operator/clusterrole.yaml",
    ]
    assert stale_files(chart) == expected
    assert sorted(write_files(chart)) == expected
    assert stale_files(chart) == [] and not orphan.exists()
    assert '| `operator.logLevel` | `"info"` | How loud. |' in (chart / "README.md").read_text()


def test_chart_check_command_exits_1_naming_stale_files(tmp_path: Path) -> None:
    chart = tmp_path / "tidal"
    shutil.copytree(CHART, chart)
    runner = CliRunner()
    assert runner.invoke(app, ["chart", "check", "--chart-dir", str(chart)]).exit_code == 0
    (chart / "Chart.yaml").write_text("apiVersion: v2\n")
    result = runner.invoke(app, ["chart", "check", "--chart-dir", str(chart)])
    assert result.exit_code == 1 and "Chart.yaml" in result.output
    result = runner.invoke(app, ["chart", "generate", "--chart-dir", str(chart)])
    assert result.exit_code == 0 and "wrote Chart.yaml" in result.output
    assert stale_files(chart) == []


def test_chart_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == __version__
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"] == ">=1.30.0-0"
    # the default images are the Dockerfile's targets
    dockerfile = (CHART.parents[1] / "Dockerfile").read_text()
    assert f"--target tidal  -t {IMAGE}" in dockerfile
    assert f"--target worker -t {DEFAULT_IMAGE}" in dockerfile
    assert "USER 65532:65532" in dockerfile and 'ENTRYPOINT ["tidal"]' in dockerfile


def test_every_value_is_documented() -> None:
    """A `# --` comment on each key, or on an object passed through whole (resources...)."""
    text = (CHART / "values.yaml").read_text()
    documented = {doc.key for doc in value_docs(text)}

    def leaves(data: Any, path: str = "") -> list[str]:
        if isinstance(data, dict) and data and path not in documented:
            return [leaf for k, v in data.items() for leaf in leaves(v, f"{path}.{k}".strip("."))]
        return [path]

    missing = [p for p in leaves(yaml.safe_load(text)) if p not in documented]
    assert not missing, f"values without a `# --` comment: {missing}"
    assert {"operator.replicas", "scheduler.extender.timeout", "nodeAgent.heartbeat"} <= documented


# -- helm lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_FILES])
def test_helm_lint_strict(values: str | None) -> None:
    extra = ["-f", str(CHART / "ci" / values)] if values else []
    result = helm(
        "lint", "--strict", str(CHART), "-n", NAMESPACE, "--kube-version", K8S_VERSION, *extra
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- objects per toggle ---------------------------------------------------------------------

ALWAYS = {
    ("Deployment", "tidal-operator"),
    ("Deployment", "tidal-scheduler"),
    ("ConfigMap", "tidal-scheduler-config"),
    ("ClusterRole", "tidal-operator"),
    ("ClusterRole", "tidal-extender"),
    ("ClusterRole", "tidal-worker"),
    ("ClusterRoleBinding", "tidal-scheduler-kube-scheduler"),
    ("ClusterRoleBinding", "tidal-scheduler-volume-scheduler"),
    ("RoleBinding", "tidal-scheduler-authentication-reader"),
    ("ValidatingAdmissionPolicy", "tidal-worker-own-pod"),
    ("ValidatingAdmissionPolicyBinding", "tidal-worker-own-pod"),
}
CRDS = {
    ("CustomResourceDefinition", f"{plural}.tidal.dev")
    for plural in ("llmservices", "llmbatchjobs", "gputopologies")
}
PEERING = {
    ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
    ("ClusterKopfPeering", "tidal-operator"),
}
LEADER = {("Role", "tidal-scheduler"), ("RoleBinding", "tidal-scheduler")}
PDBS = {("PodDisruptionBudget", "tidal-operator"), ("PodDisruptionBudget", "tidal-scheduler")}
AGENT = {("DaemonSet", "tidal-node-agent"), ("ClusterRole", "tidal-node-agent")}
PRIORITY = {("PriorityClass", "tidal-online"), ("PriorityClass", "tidal-batch")}
SPLIT = {("Deployment", "tidal-extender"), ("Service", "tidal-extender")}
CERTS = {("Certificate", "tidal-extender-tls"), ("Certificate", "tidal-scheduler-client-tls")}
MONITORS = {
    ("ServiceMonitor", "tidal-scheduler"),
    ("PodMonitor", "tidal-node-agent"),
    ("PrometheusRule", "tidal"),
}


@pytest.mark.parametrize(
    ("case", "present", "absent"),
    [
        ("defaults", ALWAYS | CRDS | AGENT | PRIORITY, PEERING | LEADER | PDBS | SPLIT | MONITORS),
        ("replicas-2", ALWAYS | CRDS | PEERING | LEADER | PDBS, SPLIT | CERTS | MONITORS),
        ("node-agent-off", ALWAYS | CRDS, AGENT | {("ServiceAccount", "tidal-node-agent")}),
        ("crds-off", ALWAYS | AGENT, CRDS | PRIORITY | PEERING),
        ("split-mode", ALWAYS | SPLIT | {("ServiceAccount", "tidal-extender")}, CERTS),
        ("all-toggles", ALWAYS | CRDS | PEERING | LEADER | PDBS | SPLIT | CERTS | MONITORS, set()),
        ("dev-cluster", ALWAYS | CRDS | AGENT, MONITORS),
    ],
)
def test_objects_per_toggle(
    case: str, present: set[tuple[str, str]], absent: set[tuple[str, str]]
) -> None:
    rendered = names(render_case(case))
    assert present <= rendered, f"missing {present - rendered}"
    assert not absent & rendered, f"unexpected {absent & rendered}"


def test_the_peering_object_is_a_hook_after_its_crd() -> None:
    """A custom resource cannot be mapped in the manifest that installs its CRD."""
    peering = one(render("replicas-2.yaml"), "ClusterKopfPeering", "tidal-operator")
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


# -- security contexts and labels -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_container_is_locked_down(case: str) -> None:
    specs = pod_specs(render_case(case))
    assert specs
    for workload, template in specs.items():
        pod = template["spec"]["securityContext"]
        for c in template["spec"]["containers"]:
            context = c["securityContext"]
            assert {k: context.get(k) for k in LOCKED} == LOCKED, (workload, c["name"])
            assert not context.get("privileged"), (workload, c["name"])
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert "hostNetwork" not in template["spec"] and "hostPID" not in template["spec"]
        if workload == agent.NAME:
            # root for the kubelet's socket directory, and nothing more
            assert pod["runAsUser"] == 0 and pod["runAsNonRoot"] is False
        else:
            assert {k: pod.get(k) for k in HARDENED} == HARDENED, workload


@pytest.mark.parametrize("case", CASES)
def test_labels_and_namespaces(case: str) -> None:
    objects = render_case(case)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels["app.kubernetes.io/part-of"] == "tidal", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/instance"] == "tidal", where
        assert labels["app.kubernetes.io/version"] == __version__, where
        assert labels["helm.sh/chart"] == f"tidal-{__version__}", where
        assert labels["app.kubernetes.io/name"] and labels["app.kubernetes.io/component"], where
        namespace = obj["metadata"].get("namespace")
        assert namespace in (None, NAMESPACE) or where.endswith("-authentication-reader")
    selectable = [t["metadata"]["labels"] for t in pod_specs(objects).values()]
    for obj in objects:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"].items()
            assert sum(selector <= labels.items() for labels in selectable) == 1, obj
        elif obj["kind"] in ("Deployment", "DaemonSet"):
            match = obj["spec"]["selector"]["matchLabels"].items()
            assert match <= obj["spec"]["template"]["metadata"]["labels"].items()


# -- generated objects equal the Python -----------------------------------------------------


@pytest.mark.parametrize(
    "extra", [(), ("research", "tidal-batch", "tidal-online")], ids=["own", "extra"]
)
def test_crds_are_the_operators(extra: tuple[str, ...]) -> None:
    sets = tuple(f"operator.allowedPriorityClasses[{i}]={name}" for i, name in enumerate(extra))
    objects = render(sets=sets)
    for crd in custom_resource_definitions(extra):
        rendered = one(objects, "CustomResourceDefinition", crd["metadata"]["name"])
        assert without_chart_metadata(rendered) == without_chart_metadata(crd)
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()
    if extra:
        service = one(objects, "CustomResourceDefinition", "llmservices.tidal.dev")
        spec = service["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        enum = spec["properties"]["priorityClassName"]["enum"]
        assert enum == ["tidal-online", "tidal-batch", "research"]
        env = container(objects, "tidal-operator", "operator")["env"]
        allowed = {"name": "TIDAL_OPERATOR_ALLOWED_PRIORITY_CLASSES"}
        assert allowed | {"value": "research,tidal-batch,tidal-online"} in env


def test_crds_drop_the_keep_policy_when_asked() -> None:
    objects = render(sets=("crds.keep=false",))
    crd = one(objects, "CustomResourceDefinition", "gputopologies.tidal.dev")
    assert "annotations" not in crd["metadata"]


def test_kopf_peering_crd_is_the_operators() -> None:
    crd = operator.kopf_peering_crd()
    rendered = one(render("replicas-2.yaml"), "CustomResourceDefinition", crd["metadata"]["name"])
    assert without_chart_metadata(rendered) == without_chart_metadata(crd)


@pytest.mark.parametrize("case", CASES)
def test_cluster_roles_are_the_pythons(case: str) -> None:
    objects = render_case(case)
    roles = [
        operator.operator_cluster_role(),
        operator.worker_cluster_role(),
        extender.cluster_role(),
    ]
    if ("DaemonSet", agent.NAME) in names(objects):
        roles.append(agent.cluster_role())
    rendered_roles = {o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRole"}
    assert rendered_roles == {r["metadata"]["name"] for r in roles}
    for role in roles:
        rendered = one(objects, "ClusterRole", role["metadata"]["name"])
        assert rendered["rules"] == role["rules"]
        assert role["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()


def test_worker_identity_and_priority_classes_are_the_operators() -> None:
    objects = render()
    python = [
        operator.worker_admission_policy(),
        operator.worker_admission_policy_binding(),
        *operator.priority_classes(),
    ]
    for obj in python:
        rendered = one(objects, obj["kind"], obj["metadata"]["name"])
        assert without_chart_metadata(rendered) == without_chart_metadata(obj)


@pytest.mark.parametrize(
    ("case", "extender_account"),
    [("defaults", "tidal-scheduler"), ("split-mode", "tidal-extender")],
)
def test_bindings_grant_each_role_to_its_account(case: str, extender_account: str) -> None:
    objects = render_case(case)
    python = [operator.operator_identity(NAMESPACE)[1], agent.manifests(agent.AgentDeployment())[2]]
    for binding in python:
        rendered = one(objects, "ClusterRoleBinding", binding["metadata"]["name"])
        assert rendered["roleRef"] == binding["roleRef"]
        assert rendered["subjects"] == binding["subjects"]
    scheduler = [{"kind": "ServiceAccount", "name": "tidal-scheduler", "namespace": NAMESPACE}]
    for name, role in [
        ("tidal-scheduler-kube-scheduler", "system:kube-scheduler"),
        ("tidal-scheduler-volume-scheduler", "system:volume-scheduler"),
    ]:
        rendered = one(objects, "ClusterRoleBinding", name)
        assert rendered["roleRef"]["name"] == role and rendered["subjects"] == scheduler
    reader = one(objects, "RoleBinding", "tidal-scheduler-authentication-reader")
    assert reader["metadata"]["namespace"] == "kube-system"
    assert reader["roleRef"]["name"] == "extension-apiserver-authentication-reader"
    ext = one(objects, "ClusterRoleBinding", extender.NAME)
    assert ext["roleRef"]["name"] == extender.NAME
    account = {"kind": "ServiceAccount", "name": extender_account, "namespace": NAMESPACE}
    assert ext["subjects"] == [account]
    pods = pod_specs(objects)
    assert pods["tidal-operator"]["spec"]["serviceAccountName"] == operator.OPERATOR
    assert pods[agent.NAME]["spec"]["serviceAccountName"] == agent.NAME


def test_leader_election_role_covers_only_its_lease() -> None:
    role = one(render("replicas-2.yaml"), "Role", "tidal-scheduler")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["tidal-scheduler"],
            "verbs": ["get", "update"],
        },
    ]


# -- hand-written workloads against the Python ----------------------------------------------


def _named(item: Any) -> bool:
    return isinstance(item, dict) and "name" in item


def contains(actual: Any, expected: Any, where: str = "") -> None:
    """Everything in ``expected`` is in ``actual`` (dicts by key, lists of named items by
    name, other lists and values exactly)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            contains(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list) and expected and all(_named(e) for e in expected):
        by_name = {item["name"]: item for item in actual}
        for item in expected:
            assert item["name"] in by_name, f"{where}[{item['name']}] missing"
            contains(by_name[item["name"]], item, f"{where}[{item['name']}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize(
    ("case", "settings"),
    [
        ("defaults", agent.AgentDeployment(namespace=NAMESPACE)),
        (
            "dev-cluster",
            agent.AgentDeployment(
                namespace=NAMESPACE, node_selector={"type": "kwok"}, runtime_class=None
            ),
        ),
    ],
)
def test_daemonset_is_the_node_agents(case: str, settings: agent.AgentDeployment) -> None:
    """What `tidal node-agent manifests` renders, plus the chart's hardening and settings."""
    rendered = one(render_case(case), "DaemonSet", agent.NAME)
    python = agent.daemon_set(settings)
    del python["spec"]["selector"]  # the chart's selector adds the release
    contains(rendered, without_chart_metadata(python) | {"metadata": {"name": agent.NAME}})
    spec = rendered["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == settings.node_selector  # no default key left over
    assert spec.get("runtimeClassName") == settings.runtime_class
    c = spec["containers"][0]
    assert c["image"] == IMAGE and c["args"] == ["--heartbeat=30"]


def test_daemonset_without_device_plugin_mounts_no_host_path() -> None:
    rendered = one(render(sets=("nodeAgent.devicePlugin.enabled=false",)), "DaemonSet", agent.NAME)
    spec = rendered["spec"]["template"]["spec"]
    assert "--no-device-plugin" in spec["containers"][0]["args"]
    assert all("hostPath" not in v for v in spec["volumes"])


@pytest.mark.parametrize("case", ["defaults", "replicas-2", "all-toggles"])
def test_operator_runs_as_tidal_operator_run(case: str) -> None:
    objects = render_case(case)
    c = container(objects, "tidal-operator", "operator")
    replicas = one(objects, "Deployment", "tidal-operator")["spec"]["replicas"]
    expected = ["operator", "run", "--liveness=http://0.0.0.0:8080/healthz", "--log-level=info"]
    if replicas > 1:
        expected.append("--peering=tidal-operator")
    assert c["command"] == ["tidal"] and c["args"] == expected
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]


def test_operator_watches_the_namespaces_given() -> None:
    objects = render(sets=("operator.namespaces={team-a,team-b}",))
    args = container(objects, "tidal-operator", "operator")["args"]
    assert args[-2:] == ["--namespace=team-a", "--namespace=team-b"]


def test_one_replica_never_runs_two_at_once() -> None:
    """Without peering or leader election a rolling update would run two operators (two
    schedulers binding): Recreate. With two replicas they elect, and roll."""
    one_each = render()
    two_each = render("replicas-2.yaml")
    for name in ("tidal-operator", "tidal-scheduler"):
        assert one(one_each, "Deployment", name)["spec"]["strategy"] == {"type": "Recreate"}
        deployment = one(two_each, "Deployment", name)
        assert "strategy" not in deployment["spec"]
        spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        (term,) = spread["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


# -- the scheduler --------------------------------------------------------------------------


def python_scheduler_config(
    url: str,
    *,
    leader: bool,
    tls: bool = False,
    timeout_s: float = 5.0,
    weight: int = 5,
    qps: int = 5000,
) -> dict[str, Any]:
    client = "/etc/tidal/extender-client" if tls else None
    config = ExtenderConfig(
        url,
        timeout_s=timeout_s,
        weight=weight,
        ca_file=client and f"{client}/ca.crt",
        cert_file=client and f"{client}/tls.crt",
        key_file=client and f"{client}/tls.key",
    )
    return scheduler_configuration(
        config, qps=qps, leader_elect=leader, profiles=SECOND_SCHEDULER, lease_namespace=NAMESPACE
    )


@pytest.mark.parametrize(
    ("case", "sets", "expected"),
    [
        ("defaults", (), python_scheduler_config("http://127.0.0.1:8888", leader=False)),
        ("replicas-2", (), python_scheduler_config("http://127.0.0.1:8888", leader=True)),
        (
            "split-mode",
            (),
            python_scheduler_config(
                f"https://tidal-extender.{NAMESPACE}.svc:8888", leader=False, tls=True
            ),
        ),
        (
            "defaults",
            (
                "scheduler.extender.timeout=500ms",
                "scheduler.extender.weight=3",
                "scheduler.extender.port=9999",
                "scheduler.kubeScheduler.qps=200",
            ),
            python_scheduler_config(
                "http://127.0.0.1:9999", leader=False, timeout_s=0.5, weight=3, qps=200
            ),
        ),
    ],
    ids=["defaults", "replicas-2", "split-mode", "custom"],
)
def test_scheduler_configuration_is_schedconfigs(
    case: str, sets: tuple[str, ...], expected: dict[str, Any]
) -> None:
    assert with_seconds(scheduler_config(render_case(case, *sets))) == with_seconds(expected)


def test_scheduler_serves_only_tidal_scheduler_through_the_loopback_extender() -> None:
    config = scheduler_config(render())
    assert config["profiles"] == [{"schedulerName": "tidal-scheduler"}]
    (entry,) = config["extenders"]
    assert entry["urlPrefix"] == "http://127.0.0.1:8888" and entry["enableHTTPS"] is False
    assert entry["bindVerb"] == "bind" and entry["ignorable"] is False
    assert "tlsConfig" not in entry and config["leaderElection"] == {"leaderElect": False}
    lease = scheduler_config(render("replicas-2.yaml"))["leaderElection"]
    assert lease["resourceNamespace"] == NAMESPACE and lease["resourceName"] == "tidal-scheduler"


def checksum(*sets: str) -> str:
    template = pod_specs(render(sets=sets))["tidal-scheduler"]
    value: str = template["metadata"]["annotations"]["checksum/config"]
    return value


def test_checksum_follows_the_configuration_only() -> None:
    assert checksum() != checksum("scheduler.extender.timeout=10s")
    assert checksum() != checksum("scheduler.replicas=2")  # leader election
    assert checksum() == checksum("scheduler.extender.logLevel=debug")  # an extender flag


def test_sidecar_extender_listens_on_loopback_and_serves_health_on_the_pod_ip() -> None:
    objects = render()
    pod = pod_specs(objects)["tidal-scheduler"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["kube-scheduler", "extender"]
    assert pod["serviceAccountName"] == "tidal-scheduler"
    ext = container(objects, "tidal-scheduler", "extender")
    assert ext["command"] == ["tidal"]
    assert ext["args"] == [
        "extender",
        "--host=127.0.0.1",
        "--port=8888",
        "--health-port=9401",
        "--reservation-ttl=300",
        "--log-level=info",
        "--log-format=json",
    ]
    assert ext["ports"] == [{"name": "metrics", "containerPort": 9401}]
    assert ext["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    sched = container(objects, "tidal-scheduler", "kube-scheduler")
    assert sched["image"] == f"registry.k8s.io/kube-scheduler:v{K8S_VERSION}"
    assert "--config=/etc/tidal-scheduler/config.yaml" in sched["command"]
    service = one(objects, "Service", "tidal-scheduler")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"https-metrics": 10259, "metrics": 9401}


def test_split_mode_puts_the_extender_behind_mutual_tls() -> None:
    objects = render("split-mode.yaml")
    pod = pod_specs(objects)["tidal-scheduler"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["kube-scheduler"]
    client = next(v for v in pod["volumes"] if v["name"] == "extender-client")
    assert client["secret"]["secretName"] == "tidal-scheduler-client-tls"
    ext = container(objects, "tidal-extender", "extender")
    assert "--host=0.0.0.0" in ext["args"]
    assert "--tls-client-ca=/etc/tidal/extender-tls/ca.crt" in ext["args"]
    deployment = one(objects, "Deployment", "tidal-extender")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod_specs(objects)["tidal-extender"]["spec"]["serviceAccountName"] == "tidal-extender"
    cert = one(render("all-toggles.yaml"), "Certificate", "tidal-extender-tls")
    assert f"tidal-extender.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]


@pytest.mark.parametrize(
    ("server", "tag"), [("1.33.2-eks-a1b2c3", "v1.33.2"), ("1.34.4+k3s1", "v1.34.4")]
)
def test_kube_scheduler_image_follows_the_server(server: str, tag: str) -> None:
    sched = container(render(kube_version=server), "tidal-scheduler", "kube-scheduler")
    assert sched["image"] == f"registry.k8s.io/kube-scheduler:{tag}"
    pinned = render(sets=("scheduler.kubeScheduler.image.tag=v1.34.0",), kube_version=server)
    assert container(pinned, "tidal-scheduler", "kube-scheduler")["image"].endswith(":v1.34.0")


def kube_scheduler_accepts(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`kube-scheduler --write-config-to`: strict decoding and validation, offline (a dummy
    kubeconfig; it never connects)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    config["clientConnection"]["kubeconfig"] = str(kubeconfig)
    source, written = tmp_path / "config.yaml", tmp_path / "written.yaml"
    source.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(tool("kube-scheduler")), f"--config={source}", f"--write-config-to={written}"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    accepted: dict[str, Any] = yaml.safe_load(written.read_text())
    return accepted


@pytest.mark.parametrize("case", ["defaults", "replicas-2", "split-mode"])
def test_kube_scheduler_accepts_the_configuration(case: str, tmp_path: Path) -> None:
    config = scheduler_config(render_case(case))
    for entry in config["extenders"]:
        if "tlsConfig" in entry:  # split mode reads its certificates at start
            pki = make_pki(tmp_path / "pki")
            entry["tlsConfig"] = {
                "caFile": str(pki.ca_cert),
                "certFile": str(pki.scheduler_client_cert),
                "keyFile": str(pki.scheduler_client_key),
            }
    accepted = kube_scheduler_accepts(config, tmp_path)
    assert [p["schedulerName"] for p in accepted["profiles"]] == ["tidal-scheduler"]
    assert accepted["extenders"][0]["urlPrefix"] == config["extenders"][0]["urlPrefix"]
    assert accepted["leaderElection"]["leaderElect"] == (case == "replicas-2")


def test_kube_scheduler_refuses_a_bad_configuration(tmp_path: Path) -> None:
    """The check above can fail: an unknown field and a zero weight are refused."""
    config = scheduler_config(render())
    config["extenders"][0]["weight"] = 0
    config["bogus"] = True
    with pytest.raises(AssertionError, match=r"bogus|weight"):
        kube_scheduler_accepts(config, tmp_path)


# -- refused values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "path"),
    [
        (("colour=blue",), "at '': additional properties 'colour' not allowed"),
        (("operator.colour=blue",), "at '/operator': additional properties 'colour'"),
        (("operator.replicas=0",), "at '/operator/replicas': minimum"),
        (("scheduler.replicas=-1",), "at '/scheduler/replicas': minimum"),
        (("scheduler.extender.mode=remote",), "at '/scheduler/extender/mode'"),
        (("operator.logLevel=verbose",), "at '/operator/logLevel'"),
        (("nodeAgent.heartbeat=often",), "at '/nodeAgent/heartbeat': got string, want number"),
        (("scheduler.extender.port=70000",), "at '/scheduler/extender/port': maximum"),
        (("scheduler.extender.timeout=5",), "at '/scheduler/extender/timeout'"),
        (
            ("operator.allowedPriorityClasses[0]=system-node-critical",),
            "at '/operator/allowedPriorityClasses/0'",
        ),
        (("crds.install=maybe",), "at '/crds/install': got string, want boolean"),
        (("operator.securityContext.runAsNonroot=true",), "at '/operator/securityContext'"),
    ],
)
def test_schema_refuses_naming_the_path(sets: tuple[str, ...], path: str) -> None:
    assert path in refused(*sets)


@pytest.mark.parametrize(
    ("sets", "namespace", "apis", "message"),
    [
        (("scheduler.extender.mode=split",), NAMESPACE, (), "needs mutual TLS"),
        (
            ("scheduler.extender.tls.existingSecret=x",),
            NAMESPACE,
            (),
            "applies to mode split only",
        ),
        (
            ("scheduler.extender.mode=split", "scheduler.extender.tls.certManager.enabled=true"),
            NAMESPACE,
            (),
            "no cert-manager.io/v1 Certificate API",
        ),
        (
            ("metrics.serviceMonitor.enabled=true",),
            NAMESPACE,
            (),
            "--api-versions monitoring.coreos.com/v1/ServiceMonitor",
        ),
        (
            ("metrics.prometheusRule.enabled=true",),
            NAMESPACE,
            ("monitoring.coreos.com/v1/ServiceMonitor",),
            "monitoring.coreos.com/v1 PrometheusRule API",
        ),
        ((), "default", (), "needs a namespace at Pod Security level privileged"),
        (("podDisruptionBudget.enabled=true",), NAMESPACE, (), "operator.replicas 1"),
        (("operator.replicas=2", "operator.namespaces={a}"), NAMESPACE, (), "namespaced peerings"),
        (("scheduler.extender.metricsPort=8888",), NAMESPACE, (), "must differ"),
    ],
)
def test_contradictions_fail_with_a_sentence(
    sets: tuple[str, ...], namespace: str, apis: tuple[str, ...], message: str
) -> None:
    assert message in refused(*sets, namespace=namespace, apis=apis)


def test_default_namespace_is_allowed_when_asked_or_without_agent() -> None:
    for sets in (("nodeAgent.allowDefaultNamespace=true",), ("nodeAgent.enabled=false",)):
        result = helm(*template_args((), sets, (), K8S_VERSION, "default"))
        assert result.returncode == 0, (sets, result.stderr)


# -- Kubernetes schemas ---------------------------------------------------------------------


CUSTOM_GROUPS = ("monitoring.coreos.com", "cert-manager.io", "kopf.dev")


def invalid(objects: list[dict[str, Any]]) -> list[str]:
    """Objects of built-in kinds that fail kubernetes-validate --strict (CRD kinds have no
    schema there)."""
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION.rsplit(".", 1)[0] + ".0", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["apiVersion"].split("/")[0] in CUSTOM_GROUPS, obj["kind"]
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_renders_pass_kubernetes_validate_strict(case: str) -> None:
    assert invalid(render_case(case)) == []


def test_kubernetes_validate_catches_a_misspelt_field() -> None:
    daemon_set = one(render(), "DaemonSet", agent.NAME)
    daemon_set["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    assert len(invalid([daemon_set])) == 1


# -- monitoring -----------------------------------------------------------------------------


def exposed_names() -> set[str]:
    """Every sample name tidal's registries expose, the node agent's with its node label."""
    metrics = AgentMetrics("gpu-node-7")
    backend = open_backend("gpu-node-7", fake="dgx-h100")
    metrics.describe(backend.facts())
    metrics.observe(backend.sample())
    metrics.heartbeat.set_to_current_time()
    metrics.allocation("tidal")
    extender_metrics = ExtenderMetrics()
    extender_metrics.latency.labels("filter").observe(0.01)
    extender_metrics.bad_requests.labels("filter").inc()
    extender_metrics.export_cache({"pods": 1}, {"pods": 0})
    out = set()
    for registry in (metrics.registry, extender_metrics.registry):
        for family in registry.collect():
            for sample in family.samples:
                out.add(sample.name)
                if registry is metrics.registry:
                    assert sample.labels["node"] == "gpu-node-7", sample
    return out


def test_node_agent_series_carry_their_node() -> None:
    metrics = AgentMetrics("gpu-node-7")
    backend = open_backend("gpu-node-7", fake="dgx-h100")
    metrics.observe(backend.sample())
    text = generate_latest(metrics.registry).decode()
    assert 'tidal_gpu_healthy{gpu="7",node="gpu-node-7"} 1.0' in text


def test_prometheus_rules_name_existing_metrics() -> None:
    rule = one(render("all-toggles.yaml"), "PrometheusRule", "tidal")
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\btidal_[a-z_]+", expr)}
    assert len(exprs) >= 5 and used
    assert used <= exposed_names(), used - exposed_names()
    assert any('endpoint="metrics"' in e and 'job="tidal-extender"' in e for e in exprs)


def test_monitors_scrape_the_named_ports() -> None:
    objects = render("all-toggles.yaml")
    ports = {
        (o["metadata"]["name"], p["name"])
        for o in objects
        if o["kind"] == "Service"
        for p in o["spec"]["ports"]
    }
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        service = monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert (service, endpoint["port"]) in ports, (service, endpoint)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_monitor = one(objects, "PodMonitor", agent.NAME)
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

"""Node agents on the real control plane: agents in fake mode publish GPUTopology objects for
KWOK nodes that carry no topology label, the extender places pods by those objects, and the
device plugin (against a kubelet double) hands a pod bound by the real kube-scheduler exactly
the GPUs the extender wrote on it.

Nodes: `agent-cube` serves the DGX-1V preset; `agent-odd` serves a fixture no preset matches:
four GPUs whose NVLink pairs are {0,2} and {1,3} while the PCIe switches hold {0,1} and {2,3},
so only a scheduler that read the published topology pairs them right.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.helpers import NodeAgent, binaries_or_skip, fresh_namespace, wait_for
from tests.kubelet_double import KubeletDouble
from tidal import api as tidal_api
from tidal.devcluster import ClusterOptions, LocalCluster
from tidal.devcluster.binaries import Binaries
from tidal.devcluster.nodes import gpu_node, gpu_pod
from tidal.kubeclient import api_client as api_client_for
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2 as api
from tidal.node_agent.manifests import AgentDeployment, manifests
from tidal.operator.kube import install

GPUTOPOLOGIES = (tidal_api.GROUP, tidal_api.VERSION, tidal_api.PLURAL_GPUTOPOLOGIES)

ODD_TOPOLOGY = {
    "name": "crossed-pairs",
    "gpu": {"model": "Test GPU", "memory_mib": 16384},
    "sockets": [
        {
            "id": 0,
            "numa_nodes": [
                {
                    "id": 0,
                    "cpu_cores": 16,
                    "host_bridges": [
                        {
                            "id": 0,
                            "switches": [{"id": 0, "gpus": [0, 1]}, {"id": 1, "gpus": [2, 3]}],
                        }
                    ],
                }
            ],
        }
    ],
    "nvlink": {"links": [[0, 2, 4], [1, 3, 4]]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agent_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        ClusterOptions(
            workdir=tmp_path_factory.mktemp("agent-cluster"),
            controller_manager=True,
            run_extender=True,
        ),
        binaries_or_skip(),
    )
    try:
        local.start()
        install(local.api_client())  # the CRDs, GPUTopology among them (the extender polls)
        core = client.CoreV1Api(local.api_client())
        for name, preset in (("agent-cube", "dgx1-v100"), ("agent-odd", "a100-pcie-nvlink-pairs")):
            node = gpu_node(name, preset)
            del node["metadata"]["labels"]["tidal.dev/topology-preset"]  # the agent tells
            core.create_node(node)
        local.wait_nodes_ready(["agent-cube", "agent-odd"])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def agents(agent_cluster: LocalCluster) -> Iterator[dict[str, tuple[NodeAgent, KubeletDouble]]]:
    fixture = agent_cluster.workdir / "crossed-pairs.yaml"
    fixture.write_text(yaml.safe_dump(ODD_TOPOLOGY))
    # unix socket paths must stay short: a directory under /tmp, not pytest's
    with tempfile.TemporaryDirectory(prefix="tidal-dp-") as sockets:
        started: dict[str, tuple[NodeAgent, KubeletDouble]] = {}
        health = agent_cluster.workdir / "agent-odd-health"
        for node, args in (
            ("agent-cube", ["--fake", "dgx1-v100"]),
            ("agent-odd", ["--fixture", str(fixture), "--fake-health", str(health)]),
        ):
            plugin_dir = Path(sockets) / node
            plugin_dir.mkdir()
            kubelet = KubeletDouble(plugin_dir)
            kubelet.start()
            log = agent_cluster.log_dir / f"node-agent-{node}.log"
            agent = NodeAgent(node, args, log, plugin_dir, free_port())
            agent.start(agent_cluster.kubeconfig)
            started[node] = (agent, kubelet)
        try:
            yield started
        finally:
            for agent, kubelet in started.values():
                agent.stop()
                if kubelet.server is not None:
                    kubelet.server.stop(0)


@pytest.fixture
def cluster(agent_cluster: LocalCluster) -> LocalCluster:
    """Named `cluster` so a failure report carries the control-plane logs."""
    return agent_cluster


@pytest.fixture
def ns(core: Any) -> Iterator[str]:
    yield from fresh_namespace(core, "agent")


def topology(custom: Any, node: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom.get_cluster_custom_object(*GPUTOPOLOGIES, node)
        return obj
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def published(custom: Any, node: str) -> dict[str, Any]:
    return wait_for(
        lambda: (obj := topology(custom, node)) and obj.get("status") and obj,
        f"GPUTopology {node} with a status",
        60,
    )


def bound(core: Any, ns: str, name: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        pod = core.read_namespaced_pod(name, ns)
        annotations = pod.metadata.annotations or {}
        return annotations if pod.spec.node_name and "tidal.dev/gpus" in annotations else None

    result: dict[str, Any] = wait_for(probe, f"pod {ns}/{name} bound with tidal.dev/gpus", 60)
    return result


def test_agents_publish_gputopology_with_owner_labels_and_heartbeat(
    agents: Any, core: Any, custom: Any, cluster: LocalCluster
) -> None:
    cube = published(custom, "agent-cube")
    node = core.read_node("agent-cube")
    assert cube["metadata"]["ownerReferences"][0]["uid"] == node.metadata.uid
    assert cube["spec"]["name"] == "dgx1-v100"
    assert cube["status"]["preset"] == "dgx1-v100"
    assert cube["status"]["healthyGPUs"] == "0,1,2,3,4,5,6,7"
    assert len(cube["status"]["devices"]) == 8
    assert node.metadata.labels["tidal.dev/topology-class"] == "nvlink"
    assert node.metadata.labels["tidal.dev/gpu-model"] == "Tesla-V100-SXM2-32GB"
    odd = published(custom, "agent-odd")
    assert "preset" not in odd["status"]  # no bundled preset matches the fixture
    assert odd["spec"]["nvlink"] == ODD_TOPOLOGY["nvlink"]
    first = cube["status"]["observedAt"]
    wait_for(
        lambda: published(custom, "agent-cube")["status"]["observedAt"] != first,
        "a newer heartbeat",
        15,
    )
    binaries = cluster.binaries
    assert isinstance(binaries, Binaries)
    table = subprocess.run(
        [str(binaries.path("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "get", "gputopo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "agent-cube" in table and "dgx1-v100" in table and "agent-odd" in table
    agent, _ = agents["agent-cube"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics").read()
    assert b'tidal_gpu_healthy{gpu="7",node="agent-cube"} 1.0' in metrics


def extender_count(cluster: LocalCluster, kind: str) -> int:
    """The extender's tidal_extender_cache_objects{kind=...} gauge."""
    assert cluster.options.extender is not None
    text = urllib.request.urlopen(f"{cluster.options.extender.url_prefix}/metrics").read().decode()
    line = next(x for x in text.splitlines() if f'cache_objects{{kind="{kind}"}}' in x)
    return int(float(line.split()[-1]))


def test_extender_places_by_the_published_topology(
    agents: Any, core: Any, ns: str, cluster: LocalCluster
) -> None:
    # kube-scheduler retries an unschedulable pod on cluster events, not when the extender
    # learns something: place pods once the extender has both topologies
    wait_for(lambda: extender_count(cluster, "topologies") == 2, "the extender to read both", 60)
    # four TP2 pods need NVLink pairs: on agent-odd those are {0,2} and {1,3} only
    for i in range(2):
        pod = gpu_pod(f"pair-{i}", 2, annotations={"tidal.dev/topology-mode": "guaranteed"})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "agent-odd"}
        core.create_namespaced_pod(ns, pod)
    sets = {bound(core, ns, f"pair-{i}")["tidal.dev/gpus"] for i in range(2)}
    assert sets == {"0,2", "1,3"}
    quad = gpu_pod("quad", 4, annotations={"tidal.dev/topology-mode": "guaranteed"})
    quad["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "agent-cube"}
    core.create_namespaced_pod(ns, quad)
    assert bound(core, ns, "quad")["tidal.dev/gpus"] in ("0,1,2,3", "4,5,6,7")


def test_device_plugin_hands_out_exactly_the_extenders_gpus(
    agents: Any, core: Any, custom: Any, ns: str
) -> None:
    _, kubelet = agents["agent-cube"]
    wait_for(lambda: kubelet.requests, "the agent's device plugin to register", 60)
    assert kubelet.requests[0].resource_name == "nvidia.com/gpu"
    uuids = [d["uuid"] for d in published(custom, "agent-cube")["status"]["devices"]]
    # a pod held Pending on its node (KWOK), as while the kubelet admits it
    pod = gpu_pod("held", 2, annotations={"tidal.dev/kwok-hold": "true"})
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "agent-cube"}
    core.create_namespaced_pod(ns, pod)
    gpus = [int(g) for g in bound(core, ns, "held")["tidal.dev/gpus"].split(",")]
    stub = kubelet.plugin("tidal-gpu.sock")
    used = set(bits_of(core, "agent-cube")) - set(gpus)
    available = [u for i, u in enumerate(uuids) if i not in used]
    preferred = stub.GetPreferredAllocation(
        api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, allocation_size=2
                )
            ]
        ),
        timeout=10,
    )
    assert list(preferred.container_responses[0].deviceIDs) == [uuids[g] for g in gpus]
    other = [u for u in available if u not in {uuids[g] for g in gpus}][:2]
    with pytest.raises(Exception) as refused:
        stub.Allocate(
            api.AllocateRequest(
                container_requests=[api.ContainerAllocateRequest(devices_ids=other)]
            ),
            timeout=10,
        )
    assert f"{ns}/held was assigned GPUs [{','.join(map(str, gpus))}]" in str(refused.value)
    response = stub.Allocate(
        api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=[uuids[g] for g in gpus])]
        ),
        timeout=10,
    )
    env = response.container_responses[0].envs
    assert env["TIDAL_GPU_IDS"] == ",".join(map(str, gpus))
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids[g] for g in gpus)


def bits_of(core: Any, node: str) -> list[int]:
    """GPUs held by the pods bound to ``node`` (their tidal.dev/gpus)."""
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
    held: list[int] = []
    for pod in pods:
        text = (pod.metadata.annotations or {}).get("tidal.dev/gpus")
        if text and pod.status.phase in ("Pending", "Running"):
            held += [int(g) for g in text.split(",")]
    return held


def test_an_unhealthy_gpu_is_reported_streamed_and_avoided(
    agents: Any, core: Any, custom: Any, ns: str, cluster: LocalCluster
) -> None:
    wait_for(lambda: not bits_of(core, "agent-odd"), "agent-odd to be empty", 60)
    (cluster.workdir / "agent-odd-health").write_text("0 XID 79 (GPU has fallen off the bus)\n")
    status = wait_for(
        lambda: (s := published(custom, "agent-odd")["status"])["healthyGPUs"] == "1,2,3" and s,
        "GPU 0 reported unhealthy",
        30,
    )
    assert status["devices"][0]["reason"] == "XID 79 (GPU has fallen off the bus)"
    _, kubelet = agents["agent-odd"]
    stream = kubelet.plugin("tidal-gpu.sock").ListAndWatch(api.Empty(), timeout=30)
    devices = next(stream).devices
    assert [d.health for d in devices] == ["Unhealthy", "Healthy", "Healthy", "Healthy"]
    stream.cancel()
    wait_for(lambda: extender_count(cluster, "unhealthy_gpus") == 1, "the extender to see it", 30)
    # the NVLink pairs are {0,2} and {1,3}: with GPU 0 gone only one TP2 group fits. The pods
    # go one after the other: created together, either may be scheduled first.
    for name in ("first", "second"):
        pod = gpu_pod(name, 2, annotations={"tidal.dev/topology-mode": "guaranteed"})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "agent-odd"}
        core.create_namespaced_pod(ns, pod)
        if name == "first":
            assert bound(core, ns, "first")["tidal.dev/gpus"] == "1,3"

    def unschedulable() -> str | None:
        conditions = core.read_namespaced_pod("second", ns).status.conditions or []
        return next(
            (c.message for c in conditions if c.type == "PodScheduled" and c.status == "False"),
            None,
        )

    message = wait_for(unschedulable, "the second pod to be reported unschedulable", 30)
    assert "1 free, 2 needed" in message  # the extender counts GPU 0 out
    assert core.read_namespaced_pod("second", ns).spec.node_name is None
    (cluster.workdir / "agent-odd-health").write_text("")


def test_agent_restart_keeps_one_object_and_node_deletion_removes_it(
    agents: Any, core: Any, custom: Any, cluster: LocalCluster
) -> None:
    agent, _ = agents["agent-odd"]
    before = published(custom, "agent-odd")
    agent.stop()
    agent.start(cluster.kubeconfig)
    stamp = before["status"]["observedAt"]
    after = wait_for(
        lambda: (o := published(custom, "agent-odd"))["status"]["observedAt"] != stamp and o,
        "the restarted agent's heartbeat",
        60,
    )
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"] == before["spec"]
    names = [
        o["metadata"]["name"] for o in custom.list_cluster_custom_object(*GPUTOPOLOGIES)["items"]
    ]
    assert sorted(names) == ["agent-cube", "agent-odd"]
    agent.stop()
    core.delete_node("agent-odd")
    wait_for(lambda: topology(custom, "agent-odd") is None, "the GPUTopology garbage-collected", 60)


def test_the_agent_runs_with_exactly_its_cluster_role(
    agent_cluster: LocalCluster, core: Any, custom: Any, ns: str
) -> None:
    """`tidal node-agent manifests`: the agent, authenticated as its ServiceAccount, publishes,
    labels its node and serves the device plugin with nothing but its ClusterRole; nothing more
    is granted; the API server accepts the DaemonSet."""
    api_client = agent_cluster.api_client()
    settings = AgentDeployment(namespace=ns)
    account, role, binding, daemon = manifests(settings)
    agent_cluster.create_objects([account, role, binding])
    node = gpu_node("agent-rbac", "dgx-h100")
    del node["metadata"]["labels"]["tidal.dev/topology-preset"]
    core.create_node(node)
    try:
        validated = client.AppsV1Api(api_client).create_namespaced_daemon_set(
            ns, daemon, dry_run="All"
        )
        assert validated.spec.template.spec.service_account_name == account["metadata"]["name"]
        kubeconfig = agent_cluster.service_account_kubeconfig(
            ns, account["metadata"]["name"], agent_cluster.workdir / "sa.kubeconfig"
        )
        as_agent = client.AuthorizationV1Api(api_client_for(kubeconfig))
        for verb, resource in (("delete", "pods"), ("get", "secrets"), ("delete", "nodes")):
            review = {"spec": {"resourceAttributes": {"verb": verb, "resource": resource}}}
            status = as_agent.create_self_subject_access_review(review).status
            assert not status.allowed, f"the agent may {verb} {resource}"
        with tempfile.TemporaryDirectory(prefix="tidal-dp-") as sockets:
            kubelet = KubeletDouble(Path(sockets))
            kubelet.start()
            log = agent_cluster.log_dir / "node-agent-agent-rbac.log"
            agent = NodeAgent("agent-rbac", ["--fake", "dgx-h100"], log, Path(sockets), free_port())
            agent.start(kubeconfig)
            try:
                status = published(custom, "agent-rbac")["status"]  # apply + status apply
                assert status["healthyGPUs"] == "0,1,2,3,4,5,6,7"
                labels = core.read_node("agent-rbac").metadata.labels
                assert labels["tidal.dev/topology-class"] == "nvswitch"
                wait_for(lambda: kubelet.requests, "the device plugin to register", 30)
                ids = [d["uuid"] for d in status["devices"]]
                preferred = kubelet.plugin("tidal-gpu.sock").GetPreferredAllocation(
                    api.PreferredAllocationRequest(
                        container_requests=[
                            api.ContainerPreferredAllocationRequest(
                                available_deviceIDs=ids, allocation_size=4
                            )
                        ]
                    ),
                    timeout=10,
                )  # lists the node's pods as the agent: refused without `list pods`
                assert len(preferred.container_responses[0].deviceIDs) == 4
            finally:
                agent.stop()
                if kubelet.server is not None:
                    kubelet.server.stop(0)
        assert b"Forbidden" not in log.read_bytes()
    finally:
        core.delete_node("agent-rbac")
        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.delete_cluster_role_binding(binding["metadata"]["name"])
        rbac.delete_cluster_role(role["metadata"]["name"])
        wait_for(lambda: topology(custom, "agent-rbac") is None, "its GPUTopology collected", 60)

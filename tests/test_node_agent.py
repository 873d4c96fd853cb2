"""Node agent: discovery (fake and NVML emulated), GPUTopology objects, allocation, the device
plugin against a test kubelet, and the standalone launcher."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_tools import protoc  # type: ignore[import-untyped]
from typer.testing import CliRunner

from tidal.cli import app
from tidal.node_agent.allocation import (
    AllocationError,
    PendingAssignment,
    container_env,
    match_allocation,
    preferred_allocation,
)
from tidal.node_agent.backend import FakeBackend, load_fixture
from tidal.node_agent.deviceplugin.server import (
    DevicePluginServer,
    GpuDevicePlugin,
    PluginOptions,
)
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2 as api
from tidal.node_agent.facts import DiscoveryError, fake_facts, matching_preset, topology_spec
from tidal.node_agent.kube import assignments
from tidal.node_agent.nvml import NvmlBackend
from tidal.node_agent.publish import Discovery, gpu_topology, label_value, topology_status
from tidal.node_agent.standalone import (
    PlacementError,
    SpecError,
    Supervisor,
    parse_spec,
    place,
)
from tidal.topology import Tier, build_topology, compile_shape, load_preset, preset_names

from .kubelet_double import KubeletDouble
from .nvml_emulation import EmulatedNvml, write_sysfs

ROOT = Path(__file__).resolve().parents[1]


def same_topology(a: Any, b: Any) -> None:
    """Links, domains per tier, NUMA placement and cores, NICs, rack domain."""
    sa, sb = compile_shape(a), compile_shape(b)
    assert sa.link_names == sb.link_names
    assert dict(sa.domains) == dict(sb.domains)
    assert sa.gpu_numa == sb.gpu_numa
    assert sa.numa_cores == sb.numa_cores
    assert a.nics() == b.nics()
    assert sa.rack_domain == sb.rack_domain
    assert (sa.gpu_model, sa.gpu_memory_mib) == (sb.gpu_model, sb.gpu_memory_mib)


# -- discovery -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", preset_names())
def test_fake_discovery_of_every_preset_equals_the_preset(preset: str) -> None:
    facts = fake_facts(preset, "node-a")
    rebuilt = build_topology(topology_spec(facts, preset), "rebuilt")
    same_topology(load_preset(preset), rebuilt)
    assert matching_preset(rebuilt) == preset


def test_fake_uuids_are_stable_per_node_and_distinct() -> None:
    a1, a2, b = (fake_facts("dgx-h100", n) for n in ("a", "a", "b"))
    assert [g.uuid for g in a1.gpus] == [g.uuid for g in a2.gpus]
    assert len({g.uuid for g in a1.gpus} | {g.uuid for g in b.gpus}) == 16


def test_discover_cli_prints_a_gputopology_that_reads_back_as_a_fixture(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["node-agent", "discover", "--fake", "rtx4090-8x", "-o", "yaml"]
    )
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.output)
    assert obj["kind"] == "GPUTopology"
    assert obj["status"]["preset"] == "rtx4090-8x"
    assert obj["status"]["topologyClass"] == "pcie"
    fixture = tmp_path / "node.yaml"
    fixture.write_text(result.output)
    facts = load_fixture(fixture, "other")
    same_topology(load_preset("rtx4090-8x"), build_topology(topology_spec(facts, "x"), "x"))


def test_discover_cli_matrix_and_errors() -> None:
    runner = CliRunner()
    matrix = runner.invoke(app, ["node-agent", "discover", "--fake", "dgx1-v100", "-o", "matrix"])
    assert matrix.exit_code == 0
    gpu0 = next(line for line in matrix.output.splitlines() if line.startswith("GPU0"))
    assert gpu0.split()[1:9] == ["X", "NV1", "NV1", "NV2", "NV2", "SYS", "SYS", "SYS"]
    bad = runner.invoke(app, ["node-agent", "discover", "--fake", "dgx-9000"])
    assert bad.exit_code == 2
    assert "unknown topology preset 'dgx-9000'" in bad.output


def test_manifests_cli_prints_the_rbac_and_daemonset_with_the_chosen_settings() -> None:
    runner = CliRunner()
    args = ["node-agent", "manifests", "--namespace", "gpu-system", "--image", "reg/tidal:dev"]
    args += ["--node-selector", "pool=gpu", "--runtime-class", "", "--resource", "x.io/gpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "&id" not in result.output  # no YAML anchors: kubectl users read these
    account, role, binding, daemon = yaml.safe_load_all(result.output)
    assert [o["kind"] for o in (account, role, binding, daemon)] == [
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet",
    ]  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tidal-node-agent", "namespace": "gpu-system"}
    ]
    # exactly the calls the agent makes (an e2e test runs it with this role and no more)
    grants = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {
        ("nodes", "get"), ("nodes", "patch"), ("pods", "list"),
        ("gputopologies", "create"), ("gputopologies", "patch"),
        ("gputopologies/status", "patch"),
    }  # fmt: skip
    pod = daemon["spec"]["template"]["spec"]
    assert daemon["metadata"]["namespace"] == "gpu-system"
    assert pod["nodeSelector"] == {"pool": "gpu"} and "runtimeClassName" not in pod
    container = pod["containers"][0]
    assert container["image"] == "reg/tidal:dev"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TIDAL_GPU_RESOURCE"] == "x.io/gpu"
    assert pod["tolerations"][0]["key"] == "x.io/gpu"
    assert container["volumeMounts"][0]["mountPath"] == "/var/lib/kubelet/device-plugins"
    # root for the kubelet's root-owned socket directory (the image's user is not), and nothing
    # more: no capability, no escalation, read-only root filesystem
    assert pod["securityContext"]["runAsUser"] == 0
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    defaults = yaml.safe_load_all(runner.invoke(app, ["node-agent", "manifests"]).output)
    assert list(defaults)[3]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    bad = runner.invoke(app, ["node-agent", "manifests", "--node-selector", "pool"])
    assert bad.exit_code == 2 and "'pool' is not KEY=VALUE" in bad.output


# -- GPUTopology object ------------------------------------------------------------------------


def test_gpu_topology_object_and_status() -> None:
    discovery = Discovery.of("gpu-7", fake_facts("hgx-a100", "gpu-7"))
    obj = gpu_topology(discovery, node_uid="uid-7")
    assert obj["metadata"]["name"] == "gpu-7"
    assert obj["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "gpu-7", "uid": "uid-7"}
    ]
    assert obj["metadata"]["labels"]["tidal.dev/topology-class"] == "nvswitch"
    assert obj["metadata"]["labels"]["tidal.dev/gpu-model"] == "NVIDIA-A100-SXM4-80GB"
    assert obj["spec"]["nvlink"] == {"nvswitch": True, "lanes": 12}
    backend = FakeBackend(discovery.facts)
    backend.set_health(3, False, "XID 79 (GPU has fallen off the bus)")
    status = topology_status(discovery, backend.sample(), now="2026-11-23T00:00:00Z")["status"]
    assert status["healthyGPUs"] == "0,1,2,4,5,6,7"
    assert status["devices"][3]["reason"].startswith("XID 79")
    assert status["observedAt"] == "2026-11-23T00:00:00Z"


def test_label_values_are_valid() -> None:
    assert label_value("NVIDIA GeForce RTX 4090") == "NVIDIA-GeForce-RTX-4090"
    assert label_value("(weird) name/with:stuff_") == "weird-name-with-stuff"
    assert len(label_value("x" * 80)) == 63


# -- allocation ------------------------------------------------------------------------------

DGX1 = Discovery.of("n", fake_facts("dgx1-v100", "n"))


def pod(
    name: str, gpus: tuple[int, ...], created: str = "2026-01-01T00:00:00Z"
) -> PendingAssignment:
    return PendingAssignment("ml", name, f"uid-{name}", gpus, created)


def test_preferred_allocation_is_the_annotated_set_of_the_oldest_waiting_pod() -> None:
    waiting = [pod("late", (4, 5), "2026-01-02T00:00:00Z"), pod("early", (6, 7))]
    chosen = preferred_allocation(DGX1.shape, set(range(8)), set(), 2, waiting, set())
    assert chosen == [6, 7]
    # once that pod got its GPUs, the next one's set is preferred
    assert preferred_allocation(
        DGX1.shape, {0, 1, 2, 3, 4, 5}, set(), 2, waiting, {"uid-early"}
    ) == [4, 5]


def test_preferred_allocation_without_a_tidal_pod_is_an_aligned_set() -> None:
    chosen = preferred_allocation(DGX1.shape, {0, 2, 3, 4, 5, 6, 7}, set(), 4, [], set())
    assert DGX1.shape.is_aligned(sum(1 << g for g in chosen), Tier.NVLINK)
    assert set(chosen) == {4, 5, 6, 7}  # the only whole NVLink quad left
    with_must = preferred_allocation(DGX1.shape, set(range(8)), {1}, 2, [], set())
    assert 1 in with_must and len(with_must) == 2


def test_allocate_matches_exactly_or_refuses_naming_the_pod() -> None:
    waiting = [pod("a", (0, 1, 2, 3)), pod("b", (4, 5, 6, 7), "2026-01-03T00:00:00Z")]
    assert match_allocation([4, 5, 6, 7], waiting, set()) == waiting[1]
    with pytest.raises(AllocationError) as error:
        match_allocation([0, 1, 4, 5], waiting, set())
    text = str(error.value)
    assert "offered GPUs [0,1,4,5]" in text
    assert "ml/a was assigned GPUs [0,1,2,3]" in text and "ml/b was assigned GPUs [4,5,6,7]" in text
    assert match_allocation([0, 1], waiting, set()) is None  # no tidal pod of that size


def test_waiting_pods_are_tidal_pods_the_kubelet_has_not_admitted() -> None:
    def pending(name: str, gpus: str | None, statuses: list[Any] | None = None) -> Any:
        annotations = {"tidal.dev/gpus": gpus} if gpus else {}
        meta = {"namespace": "ml", "name": name, "uid": f"u-{name}", "annotations": annotations}
        return {"metadata": meta, "status": {"containerStatuses": statuses}}

    admitted = [{"name": "w", "state": {"waiting": {"reason": "ContainerCreating"}}}]
    pods = [
        pending("new", "0,2"),
        pending("admitted", "1,3", admitted),  # got its GPUs before an agent restart
        pending("untouched", None),  # not placed by tidal
        pending("garbled", "0,0"),
    ]
    assert [(a.name, a.uid, a.gpus) for a in assignments(pods)] == [("new", "u-new", (0, 2))]


def test_container_env_fits_the_set() -> None:
    env = container_env(DGX1.facts, DGX1.topology, DGX1.shape, [0, 1, 2, 3])
    uuids = [DGX1.facts.gpus[i].uuid for i in range(4)]
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
    assert env["TIDAL_GPU_IDS"] == "0,1,2,3"
    assert env["TIDAL_GPU_TIER"] == "nvlink"
    assert env["NCCL_P2P_LEVEL"] == "NVL"
    assert env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1"
    cross = container_env(DGX1.facts, DGX1.topology, DGX1.shape, [1, 6])
    assert cross["NCCL_P2P_LEVEL"] == "SYS"
    assert cross["TIDAL_GPU_LINK"] == "SYS"
    assert cross["TIDAL_GPU_TIER"] == "node"


# -- the device plugin against a test kubelet ------------------------------------------------


class Pods:
    def __init__(self, waiting: list[PendingAssignment]) -> None:
        self.items = waiting

    def waiting(self) -> list[PendingAssignment]:
        return list(self.items)


@pytest.fixture
def kubelet() -> Iterator[tuple[KubeletDouble, DevicePluginServer, GpuDevicePlugin, Pods]]:
    # unix socket paths are limited to ~100 characters: pytest's tmp_path can be too long
    with tempfile.TemporaryDirectory(prefix="dp-") as directory:
        test_kubelet = KubeletDouble(Path(directory))
        test_kubelet.start()
        pods = Pods([pod("chat-0", (0, 1, 2, 3)), pod("batch-3", (6, 7))])
        plugin = GpuDevicePlugin(DGX1, pods)
        options = PluginOptions(directory=Path(directory), watch_interval_s=0.1)
        server = DevicePluginServer(plugin, options)
        server.start()
        try:
            yield test_kubelet, server, plugin, pods
        finally:
            server.stop()
            assert test_kubelet.server is not None
            test_kubelet.server.stop(0)


def test_device_plugin_registers_and_streams_health(kubelet: Any) -> None:
    test_kubelet, _, plugin, _ = kubelet
    request = test_kubelet.requests[0]
    assert (request.version, request.resource_name, request.endpoint) == (
        "v1beta1", "nvidia.com/gpu", "tidal-gpu.sock",
    )  # fmt: skip
    assert request.options.get_preferred_allocation_available
    stub = test_kubelet.plugin("tidal-gpu.sock")
    assert stub.GetDevicePluginOptions(api.Empty()).get_preferred_allocation_available
    stream = stub.ListAndWatch(api.Empty())
    first = next(stream)
    assert [d.ID for d in first.devices] == [g.uuid for g in DGX1.facts.gpus]
    assert {d.health for d in first.devices} == {"Healthy"}
    assert [d.topology.nodes[0].ID for d in first.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    backend = FakeBackend(DGX1.facts)
    backend.set_health(5, False, "XID 48 (double-bit ECC error)")
    plugin.update_health(backend.sample())
    second = next(stream)
    assert [d.health for d in second.devices].count("Unhealthy") == 1
    assert second.devices[5].health == "Unhealthy"
    stream.cancel()


def test_device_plugin_allocates_exactly_the_annotated_gpus(kubelet: Any) -> None:
    test_kubelet, _, _, _ = kubelet
    stub = test_kubelet.plugin("tidal-gpu.sock")
    uuids = [g.uuid for g in DGX1.facts.gpus]
    preferred = stub.GetPreferredAllocation(
        api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=uuids, allocation_size=4
                )
            ]
        )
    )
    assert list(preferred.container_responses[0].deviceIDs) == uuids[:4]
    response = stub.Allocate(
        api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=uuids[:4])]
        )
    )
    container = response.container_responses[0]
    assert container.envs["CUDA_VISIBLE_DEVICES"] == ",".join(uuids[:4])
    assert container.envs["TIDAL_GPU_IDS"] == "0,1,2,3"
    assert container.envs["NCCL_P2P_LEVEL"] == "NVL"
    paths = [d.host_path for d in container.devices]
    assert paths[:4] == ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3"]
    assert "/dev/nvidiactl" in paths


def test_device_plugin_refuses_a_mismatch_with_the_pod_and_gpus(kubelet: Any) -> None:
    test_kubelet, _, _, _ = kubelet
    stub = test_kubelet.plugin("tidal-gpu.sock")
    uuids = [g.uuid for g in DGX1.facts.gpus]
    with pytest.raises(grpc.RpcError) as error:
        stub.Allocate(
            api.AllocateRequest(
                container_requests=[api.ContainerAllocateRequest(devices_ids=[uuids[4], uuids[5]])]
            )
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ml/batch-3 was assigned GPUs [6,7]" in error.value.details()
    assert "offered GPUs [4,5]" in error.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Allocate(
            api.AllocateRequest(
                container_requests=[api.ContainerAllocateRequest(devices_ids=["GPU-x"])]
            )
        )
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_device_plugin_registers_again_after_a_kubelet_restart(kubelet: Any) -> None:
    test_kubelet, server, _, _ = kubelet
    assert server.registrations == 1
    test_kubelet.restart()
    assert test_kubelet.registered.wait(10), "the plugin did not register with the new kubelet"
    wait_for(lambda: server.registrations == 2)
    assert test_kubelet.requests[-1].endpoint == "tidal-gpu.sock"
    stub = test_kubelet.plugin("tidal-gpu.sock")
    assert stub.GetDevicePluginOptions(api.Empty(), timeout=5).get_preferred_allocation_available


def test_generated_grpc_stubs_match_the_proto(tmp_path: Path) -> None:
    proto = "tidal/node_agent/deviceplugin/v1beta1/api.proto"
    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / proto)]  # fmt: skip
    assert protoc.main(args) == 0
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        generated = (tmp_path / Path(proto).parent / name).read_text()
        committed = (ROOT / Path(proto).parent / name).read_text()
        assert generated == committed, f"{name} is stale: run `make protos`"


# -- standalone ------------------------------------------------------------------------------

REPORT_ENV = [sys.executable, "-c",
              "import os; print('GPUS=' + os.environ['TIDAL_GPU_IDS'], flush=True); "
              "import time; time.sleep(60)"]  # fmt: skip


def spec_text(workers: list[dict[str, Any]], log_dir: Path, grace: float = 5) -> str:
    return yaml.safe_dump({"logDir": str(log_dir), "stopGracePeriodSeconds": grace,
                           "workers": workers})  # fmt: skip


def test_standalone_spec_errors_name_the_field(tmp_path: Path) -> None:
    cases = [
        ({"name": "Chat", "gpus": 1, "command": ["x"]}, "workers[0].name"),
        ({"name": "chat", "gpus": 0, "command": ["x"]}, "workers[0].gpus"),
        ({"name": "chat", "gpus": 1, "command": "x"}, "workers[0].command"),
        (
            {"name": "chat", "gpus": 1, "command": ["x"], "restart": "sometimes"},
            "workers[0].restart",
        ),
        (
            {"name": "chat", "gpus": 2, "command": ["x"], "topology": {"tier": "rack"}},
            "topology.tier",
        ),
        (
            {"name": "chat", "gpus": 2, "command": ["x"], "topology": {"mode": "strict"}},
            "topology.mode",
        ),
    ]
    for worker, field in cases:
        with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_spec(spec_text([worker], tmp_path), "spec.yaml")


def test_standalone_places_groups_on_aligned_gpus(tmp_path: Path) -> None:
    spec = parse_spec(
        spec_text(
            [
                {"name": "small", "gpus": 2, "replicas": 2, "command": ["x"]},
                {"name": "big", "gpus": 4, "command": ["x"]},
            ],
            tmp_path,
        ),
        "spec.yaml",
    )
    slots = place(spec, DGX1, healthy=list(range(8)))
    by_name = {s.name: s.gpus for s in slots}
    assert [s.name for s in slots] == ["small-0", "small-1", "big-0"]
    assert set(by_name["big-0"]) in ({0, 1, 2, 3}, {4, 5, 6, 7})
    quad = set(range(8)) - set(by_name["big-0"])
    for name in ("small-0", "small-1"):
        assert set(by_name[name]) <= quad
        mask = sum(1 << g for g in by_name[name])
        assert DGX1.shape.is_aligned(mask, Tier.NVLINK)
    # with a GPU down, two guaranteed quads no longer fit
    two_quads = parse_spec(spec_text([{"name": "q", "gpus": 4, "replicas": 2, "command": ["x"]}],
                                     tmp_path), "s")  # fmt: skip
    with pytest.raises(PlacementError, match="worker q-1 needs 4 GPUs"):
        place(two_quads, DGX1, healthy=[0, 1, 2, 3, 4, 5, 7])


def test_a_serve_entry_starts_a_real_tidal_worker_with_the_operators_env(tmp_path: Path) -> None:
    serve = {"model": "hf://org/m", "port": 9000, "args": ["--max-batch=8"]}
    entry = {"name": "chat", "gpus": 2, "replicas": 2, "serve": serve,
             "env": {"TIDAL_DTYPE": "float16"}}  # fmt: skip
    spec = parse_spec(spec_text([entry], tmp_path), "spec.yaml")
    (worker,) = spec.workers
    worker_cli = (sys.executable, "-m", "tidal", "worker", "serve")
    assert worker.command_for(0) == (*worker_cli, "--port=9000", "--max-batch=8")
    assert worker.command_for(1) == (*worker_cli, "--port=9001", "--max-batch=8")  # one machine
    env = worker.env_for(1)
    assert env == {
        "TIDAL_MODEL_NAME": "chat", "TIDAL_MODEL_URI": "hf://org/m",
        "TIDAL_DTYPE": "float16",  # the entry's env wins
        "TIDAL_ATTENTION": "int8", "TIDAL_TENSOR_PARALLEL": "2", "TIDAL_WORKER_INDEX": "1",
    }  # fmt: skip
    supervisor = Supervisor(spec, DGX1, place(spec, DGX1, healthy=list(range(8))))
    first = supervisor.workers[0].env
    assert (first["TIDAL_WORKER_INDEX"], first["TIDAL_MODEL_URI"]) == ("0", "hf://org/m")
    assert "TIDAL_GPU_IDS" in first  # and the device plugin's environment, as before


def test_a_batch_entry_gets_its_shard_checkpoints_and_resume_point(tmp_path: Path) -> None:
    batch = {"model": "file:///m", "input": "file:///in/", "output": "file:///out/",
             "checkpointIntervalSeconds": 60, "resumeFrom": "file:///out/ckpt/3",
             "modelName": "llama", "attention": "fp16"}  # fmt: skip
    spec = parse_spec(
        spec_text([{"name": "sum", "gpus": 1, "replicas": 3, "batch": batch}], tmp_path), "s"
    )
    (worker,) = spec.workers
    assert worker.command_for(2) == (sys.executable, "-m", "tidal", "worker", "batch")
    env = worker.env_for(2)
    assert {k: env[k] for k in ("TIDAL_MODEL_NAME", "TIDAL_ATTENTION", "TIDAL_SHARD")} == {
        "TIDAL_MODEL_NAME": "llama", "TIDAL_ATTENTION": "fp16", "TIDAL_SHARD": "2/3"
    }  # fmt: skip
    assert (env["TIDAL_INPUT_URI"], env["TIDAL_OUTPUT_URI"]) == ("file:///in/", "file:///out/")
    assert (env["TIDAL_CHECKPOINT_INTERVAL_SECONDS"], env["TIDAL_ATTEMPT"]) == ("60", "1")
    assert env["TIDAL_RESUME_FROM"] == "file:///out/ckpt/3"


def test_a_tidal_worker_entry_says_which_field_is_wrong(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"command": ["x"], "serve": {"model": "hf://o/m"}}, "exactly one of command, serve"),
        ({}, r"exactly one of command, serve and batch \(got none\)"),
        ({"serve": {"port": 80}}, r"workers\[0\]\.serve\.model"),
        ({"serve": {"model": "hf://o/m", "port": 70000}}, r"serve\.port"),
        ({"serve": {"model": "hf://o/m", "args": "--x"}}, r"serve\.args"),
        ({"batch": {"model": "hf://o/m", "output": "file:///o"}}, r"batch\.input"),
        ({"batch": "hf://o/m"}, r"workers\[0\]\.batch: expected a mapping"),
    ]
    for entry, problem in cases:
        with pytest.raises(SpecError, match=problem):
            parse_spec(spec_text([{"name": "w", "gpus": 1, **entry}], tmp_path), "spec.yaml")


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_supervisor_runs_restarts_and_stops(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]
    spec = parse_spec(
        spec_text(
            [
                {"name": "serve", "gpus": 4, "command": REPORT_ENV},
                {"name": "flaky", "gpus": 1, "command": crash, "restart": "always"},
                {"name": "once", "gpus": 1, "command": [sys.executable, "-c", "pass"]},
            ],
            tmp_path / "logs",
        ),
        "spec.yaml",
    )
    slots = place(spec, DGX1, healthy=list(range(8)))
    supervisor = Supervisor(spec, DGX1, slots)
    supervisor.STABLE_S = 1e9
    thread = threading.Thread(target=supervisor.run, kwargs={"poll_s": 0.05})
    thread.start()
    try:
        serve, flaky, once = supervisor.workers
        log = tmp_path / "logs" / "serve-0.log"
        wait_for(lambda: "GPUS=" in (log.read_text() if log.exists() else ""))
        assert f"GPUS={','.join(map(str, serve.slot.gpus))}" in log.read_text()
        wait_for(lambda: flaky.restarts >= 2)  # backoff 1 s, then 2 s
        assert flaky.exit_codes[:2] == [3, 3]
        wait_for(lambda: once.finished)
        assert once.exit_codes == [0] and once.restarts == 0
        assert serve.process is not None and serve.process.poll() is None
    finally:
        supervisor.stop()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert serve.process is None and serve.exit_codes[-1] == -15  # SIGTERM, cleanly


def test_standalone_cli_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text([{"name": "chat", "gpus": 2, "command": REPORT_ENV}], tmp_path / "l"))
    process = subprocess.Popen(
        [sys.executable, "-m", "tidal", "node-agent", "standalone", "--spec", str(spec),
         "--fake", "a100-pcie-nvlink-pairs"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = tmp_path / "l" / "chat-0.log"
    wait_for(lambda: "GPUS=" in (log.read_text() if log.exists() else ""), timeout=30)
    assert "GPUS=0,1" in log.read_text() or "GPUS=2,3" in log.read_text()  # an NVLink pair
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "chat-0" in stderr  # the placement table


# -- the NVML backend, against an emulated pynvml and /sys -----------------------------------


def nvml_backend(preset: str, sysfs: Path) -> tuple[NvmlBackend, EmulatedNvml]:
    facts = fake_facts(preset, "real")
    write_sysfs(sysfs, load_preset(preset), facts)
    nvml = EmulatedNvml(facts)
    return NvmlBackend(nvml=nvml, sysfs=sysfs), nvml  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", preset_names())
def test_nvml_discovery_rebuilds_the_machine(preset: str, tmp_path: Path) -> None:
    backend, _ = nvml_backend(preset, tmp_path)
    facts = backend.facts()
    assert facts.source == "nvml"
    assert (facts.driver_version, facts.cuda_version) == ("560.35.03", "12.6")
    assert facts.gpus[0].name == load_preset(preset).gpu_model  # bytes from NVML decoded
    expected = fake_facts(preset, "real")
    assert [(n.name, n.numa_node, n.pcie) for n in facts.nics] == [
        (n.name, n.numa_node, n.pcie) for n in expected.nics
    ]  # NIC path classes from sysfs ancestry, as nvidia-smi topo -m shows them
    assert [g.behind_switch for g in facts.gpus] == [g.behind_switch for g in expected.gpus]
    rebuilt = build_topology(topology_spec(facts, "discovered"), "nvml")
    topology = load_preset(preset)
    # the rack domain comes from the fabric manager, which the emulation does not run
    if topology.rack_domain is None:
        same_topology(topology, rebuilt)
        assert matching_preset(rebuilt) == preset
    assert compile_shape(rebuilt).link_names == compile_shape(topology).link_names


def test_nvml_xid_marks_a_gpu_unhealthy_but_not_application_errors(tmp_path: Path) -> None:
    backend, nvml = nvml_backend("dgx-h100", tmp_path)
    assert all(s.healthy for s in backend.sample())
    nvml.xid(2, 13)  # graphics engine exception: the application's fault
    assert all(s.healthy for s in backend.sample())
    nvml.xid(5, 79)
    samples = backend.sample()
    assert [s.index for s in samples if not s.healthy] == [5]
    assert samples[5].reason == "XID 79 (GPU has fallen off the bus)"
    assert samples[1].utilization == 0.25 and samples[1].memory_used_mib == 2048


def test_nvml_without_a_driver_says_what_to_do(tmp_path: Path) -> None:
    nvml = EmulatedNvml(fake_facts("single-gpu", "x"), driver_loaded=False)
    with pytest.raises(DiscoveryError, match=r"Driver Not Loaded.*--fake PRESET"):
        NvmlBackend(nvml=nvml, sysfs=tmp_path)  # type: ignore[arg-type]


def test_fake_health_file_simulates_xids(tmp_path: Path) -> None:
    health = tmp_path / "health"
    backend = FakeBackend(fake_facts("pcie-2x", "n"), health)
    assert all(s.healthy for s in backend.sample())  # no file yet
    health.write_text("1 XID 48 (double-bit ECC error)\n7 beyond the node\nnot a line\n")
    samples = backend.sample()
    assert [(s.index, s.healthy, s.reason) for s in samples] == [
        (0, True, ""),
        (1, False, "XID 48 (double-bit ECC error)"),
    ]
    health.write_text("")
    assert all(s.healthy for s in backend.sample())

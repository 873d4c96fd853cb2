"""Small helpers for e2e tests: polling with a readable failure, binaries or skip, a running
cluster per module, a namespace per test, the model volume and worker pods run as local
processes, node agents run as local processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from e2e.pod_process import PodProcess
from tidal.devcluster import Binaries, ClusterOptions, DevClusterError, LocalCluster, find_binaries

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], what: str, timeout_s: float = 30.0, every_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def binaries_or_skip() -> Binaries:
    """The cached control-plane binaries; without them skip, unless TIDAL_E2E=require (CI)."""
    try:
        return find_binaries()
    except DevClusterError as error:
        if os.environ.get("TIDAL_E2E") == "require":
            raise
        pytest.skip(str(error))


def fresh_namespace(core: Any, prefix: str, drain_timeout_s: float = 60.0) -> Iterator[str]:
    """A fresh namespace for one test (use with ``yield from`` in a fixture). Pods of a deleted
    namespace go through KWOK's delete stage; waiting for them keeps the tests independent."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
    wait_for(lambda: not core.list_namespaced_pod(name).items, f"namespace {name} to drain",
             drain_timeout_s)  # fmt: skip


def running_cluster(
    workdir: Any,
    nodes: list[tuple[str, str]],
    priority_classes: dict[str, int] | None = None,
    **options: Any,
) -> Iterator[LocalCluster]:
    """A started local cluster with ``nodes`` (name, preset) ready and ``priority_classes``
    created, stopped afterwards (use with ``yield from`` in a module-scoped fixture)."""
    from kubernetes import client  # noqa: PLC0415

    local = LocalCluster(ClusterOptions(workdir=workdir, **options), binaries_or_skip())
    try:
        local.start()
        local.wait_nodes_ready(local.add_gpu_nodes(nodes))
        scheduling = client.SchedulingV1Api(local.api_client())
        for name, value in (priority_classes or {}).items():
            body = {"metadata": {"name": name}, "value": value}
            scheduling.create_priority_class({**body, "preemptionPolicy": "PreemptLowerPriority"})
        yield local
    finally:
        local.stop()


# -- workers: the model volume, and worker pods run as local processes ------------------------

MODEL_CLAIM = "models"
NO_GPUS = {"CUDA_VISIBLE_DEVICES": ""}  # the device plugin's Allocate environment, CPU-only


def model_volume(root: Path) -> str:
    """Fill ``root`` as the model volume (a folder standing in for the claim, SmolLM2 in it);
    the model's pvc:// URI."""
    from tidal.inference_worker.weights.resolve import smollm2_gguf  # noqa: PLC0415

    model = smollm2_gguf()
    (root / MODEL_CLAIM).mkdir()
    (root / MODEL_CLAIM / model.name).symlink_to(model)
    return f"pvc://{MODEL_CLAIM}/{model.name}"


def claim_model_volume(core: Any, ns: str, root: Path) -> None:
    """The claim the pods mount: a PersistentVolume on the local folder, bound to it (the
    scheduler places a pod only once its claims are bound)."""
    pv = f"{ns}-{MODEL_CLAIM}"
    core.create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                 "storageClassName": "", "hostPath": {"path": str(root / MODEL_CLAIM)},
                 "claimRef": {"namespace": ns, "name": MODEL_CLAIM}},
    })  # fmt: skip
    core.create_namespaced_persistent_volume_claim(ns, {
        "metadata": {"name": MODEL_CLAIM},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}},
    })  # fmt: skip

    def bound() -> bool:
        phase: str = core.read_namespaced_persistent_volume_claim(MODEL_CLAIM, ns).status.phase
        return phase == "Bound"

    wait_for(bound, f"claim {MODEL_CLAIM} to bind", 60)


def model_spec(uri: str) -> dict[str, Any]:
    """An LLMService's or LLMBatchJob's spec.model: SmolLM2 at ``uri``, served as "smol"."""
    return {"name": "smol", "uri": uri, "dtype": "float32", "attention": "fp16"}


def run_pod(
    cluster: LocalCluster,
    core: Any,
    ns: str,
    name: str,
    tmp: Path,
    volume: Path,
    admit: Callable[[dict[str, Any]], Mapping[str, str]] | None = None,
) -> PodProcess:
    """Run worker pod ``ns/name`` as a local process (CPU only, the model volume at
    ``volume``, a token bound to the pod; ``admit`` as :class:`PodProcess` takes it), started."""
    process = PodProcess(
        core, name, ns, extra_env={**NO_GPUS, "TIDAL_PVC_ROOT": str(volume)},
        kubeconfig=cluster.pod_kubeconfig(ns, name, tmp / f"{name}.kubeconfig"), log_dir=tmp,
        admit=admit,
    )  # fmt: skip
    process.start()
    return process


# -- node agents run as local processes -------------------------------------------------------


@dataclass
class NodeAgent:
    """`tidal node-agent run` for ``node`` (``args``: --fake PRESET, --fixture F, ...), its
    device plugin in ``plugin_dir`` (a KubeletDouble's), /metrics on ``metrics_port``."""

    node: str
    args: list[str]
    log: Path
    plugin_dir: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self, kubeconfig: Path) -> None:
        command = [
            sys.executable, "-m", "tidal", "node-agent", "run", "--node-name", self.node,
            "--kubeconfig", str(kubeconfig), "--plugin-dir", str(self.plugin_dir),
            "--metrics-port", str(self.metrics_port), "--heartbeat", "1",
            "--health-interval", "0.2", *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

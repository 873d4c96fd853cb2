"""The real worker in the operator's pods, on the real control plane (E2E: kube-apiserver,
kube-scheduler with tidal's extender, the operator, KWOK nodes).

KWOK runs no containers, so each worker pod the operator creates is run as a local process
with its exact command line and environment, plus the device plugin's Allocate environment
(no GPUs here) and a token bound to the pod (``e2e/pod_process.py``, a kubelet for one pod).
The model is SmolLM2-135M-Instruct behind a ``pvc://`` URI (the volume is a local folder).

1. An LLMBatchJob of 200 chat records: its worker is preempted mid-shard by an LLMService that
   needs the node's GPUs, checkpoints in its grace period, exits 143; the operator counts a
   preemption and starts attempt 2 with TIDAL_RESUME_FROM; once the service scales to zero the
   job completes, and its output equals an uninterrupted run line by line, each custom_id once.
2. An LLMService replica serves chat completions; Ready after the model loads, not Ready once
   SIGTERM starts its drain, exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from e2e.helpers import (
    NO_GPUS,
    claim_model_volume,
    fresh_namespace,
    model_spec,
    model_volume,
    run_pod,
    running_cluster,
    wait_for,
)
from tidal import api
from tidal.devcluster import LocalCluster
from tidal.devcluster.nodes import node_names
from tidal.inference_worker.parallel.launch import free_port

NODES = node_names(1, ["dgx1-v100"], prefix="wk")  # 8 GPUs
RECORDS = 200


@pytest.fixture(scope="module")
def wk_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("worker-cluster"), NODES,
        controller_manager=True, run_extender=True, run_operator=True,
    )  # fmt: skip


@pytest.fixture
def cluster(wk_cluster: LocalCluster) -> LocalCluster:
    return wk_cluster


@pytest.fixture
def ns(core: Any, volume: tuple[Path, str]) -> Iterator[str]:
    for name in fresh_namespace(core, "wk"):
        claim_model_volume(core, name, volume[0])
        yield name


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The model volume (a folder standing in for the claim) and the model's pvc:// URI."""
    root = tmp_path_factory.mktemp("pvc")
    return root, model_volume(root)


def write_records(path: Path) -> None:
    path.mkdir(parents=True)
    with (path / "requests.jsonl").open("w") as f:
        for i in range(RECORDS):
            messages = [{"role": "user", "content": f"Write one sentence about the number {i}."}]
            body = {"model": "smol", "messages": messages, "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            line = {"custom_id": f"rec-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body}  # fmt: skip
            f.write(json.dumps(line) + "\n")


def committed_lines(out: Path) -> list[dict[str, Any]]:
    """The output the last checkpoint commits: its parts, in order."""
    last = sorted((out / "_checkpoints" / "shard-0").glob("ckpt-*.json"))[-1]
    parts = json.loads(last.read_text())["parts"]
    return [json.loads(line) for p in parts for line in (out / p["name"]).read_text().splitlines()]


def answers(lines: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(r["custom_id"], r["response"]["body"]["choices"]) for r in lines]


def uninterrupted_run(inp: Path, out: Path, volume: Path, uri: str) -> None:
    """The reference: the same worker command, one attempt, nobody in the way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDAL_")}
    env.update(NO_GPUS, TIDAL_PVC_ROOT=str(volume), TIDAL_MODEL_URI=uri, TIDAL_MODEL_NAME="smol",
               TIDAL_DTYPE="float32", TIDAL_ATTENTION="fp16", TIDAL_INPUT_URI=f"file://{inp}",
               TIDAL_OUTPUT_URI=f"file://{out}", TIDAL_SHARD="0/1", TIDAL_ATTEMPT="1",
               TIDAL_CHECKPOINT_INTERVAL_SECONDS="600")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tidal.cli", "worker", "batch"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def batch_pods(core: Any, ns: str, attempt: int) -> list[Any]:
    pods = core.list_namespaced_pod(ns, label_selector=f"{api.LABEL_LLMBATCHJOB}=digest").items
    return [p for p in pods if p.metadata.annotations.get(api.ANNOTATION_ATTEMPT) == str(attempt)]


def custom_get(custom: Any, ns: str, plural: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, plural, name
    )
    return obj


def test_a_preempted_batch_worker_checkpoints_resumes_and_the_output_equals_an_uninterrupted_run(
    cluster: LocalCluster, core: Any, custom: Any, ns: str, tmp_path: Path,
    volume: tuple[Path, str],
) -> None:  # fmt: skip
    root, uri = volume
    inp, out, reference = tmp_path / "in", tmp_path / "out", tmp_path / "reference"
    write_records(inp)
    uninterrupted_run(inp, reference, root, uri)

    job = {
        "apiVersion": api.API_VERSION, "kind": api.KIND_LLMBATCHJOB,
        "metadata": {"name": "digest"},
        "spec": {"model": model_spec(uri), "tensorParallel": 1, "parallelism": 1,
                 "input": {"uri": f"file://{inp}"}, "output": {"uri": f"file://{out}"},
                 "checkpointIntervalSeconds": 30, "resources": {"cpu": "1", "memory": "1Gi"}},
    }  # fmt: skip
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL_LLMBATCHJOBS, job)
    (first,) = wait_for(lambda: batch_pods(core, ns, 1) or None, "the job's first worker pod", 60)
    worker = run_pod(cluster, core, ns, first.metadata.name, tmp_path, root)
    with worker:
        # Mid-shard: the model loaded and records under way (the first checkpoint is at 30 s).
        wait_for(lambda: "KV cache:" in worker.log_text(), "the worker to load its model", 120)
        time.sleep(8)
        # The tide comes in: two TP4 replicas need both NVLink quads, the worker's GPU too.
        service = {
            "apiVersion": api.API_VERSION, "kind": api.KIND_LLMSERVICE,
            "metadata": {"name": "peak"},
            "spec": {"model": {"name": "big", "uri": "hf://org/big"}, "tensorParallel": 4,
                     "replicas": 2, "resources": {"cpu": "1", "memory": "1Gi"}},
        }  # fmt: skip
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.PLURAL_LLMSERVICES, service
        )
        assert worker.wait_exit(180) == 143, worker.tail()
    final = worker.last_pod
    checkpoint = final["metadata"]["annotations"][api.ANNOTATION_CHECKPOINT]
    saved = json.loads(Path(checkpoint.removeprefix("file://")).read_text())
    assert 0 < saved["next_record"] < RECORDS, saved  # preempted mid-shard, work kept

    def resumed() -> Any:
        status = custom_get(custom, ns, api.PLURAL_LLMBATCHJOBS, "digest").get("status") or {}
        pods = batch_pods(core, ns, 2)
        return (status, pods[0]) if status.get("preemptions") == 1 and pods else None

    status, second = wait_for(resumed, "a preemption counted and attempt 2 created", 90)
    assert status.get("failed", 0) == 0
    env = {e.name: e.value for e in second.spec.containers[0].env}
    assert env["TIDAL_RESUME_FROM"] == checkpoint
    # The tide goes out: the service scales to zero, attempt 2 gets the GPU and finishes.
    custom.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL_LLMSERVICES, "peak", {"spec": {"replicas": 0}}
    )
    with run_pod(cluster, core, ns, second.metadata.name, tmp_path, root) as again:
        assert again.wait_exit(600) == 0, again.tail()
    assert "resum" in again.log_text()  # it said where it resumed from

    def succeeded() -> Any:
        status = custom_get(custom, ns, api.PLURAL_LLMBATCHJOBS, "digest").get("status") or {}
        return status if status.get("phase") == "Succeeded" else None

    wait_for(succeeded, "the job to succeed", 60)
    got, want = committed_lines(out), committed_lines(reference)
    assert [r["custom_id"] for r in got] == [f"rec-{i}" for i in range(RECORDS)]
    assert answers(got) == answers(want)


def test_a_service_replica_serves_chat_ready_after_load_and_unready_on_sigterm(
    cluster: LocalCluster, core: Any, custom: Any, ns: str, tmp_path: Path,
    volume: tuple[Path, str],
) -> None:  # fmt: skip
    root, uri = volume
    port = free_port()
    service = {
        "apiVersion": api.API_VERSION, "kind": api.KIND_LLMSERVICE,
        "metadata": {"name": "chat"},
        "spec": {"model": model_spec(uri), "tensorParallel": 1, "replicas": 1, "port": port,
                 "resources": {"cpu": "1", "memory": "1Gi"}},
    }  # fmt: skip
    custom.create_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL_LLMSERVICES, service
    )

    def replica() -> Any:
        pods = core.list_namespaced_pod(ns, label_selector=f"{api.LABEL_LLMSERVICE}=chat").items
        return pods[0] if pods else None

    pod = wait_for(replica, "the replica pod", 60)
    with run_pod(cluster, core, ns, pod.metadata.name, tmp_path, root) as server:
        server.wait_ready(120)

        def ready_replicas() -> Any:
            status = custom_get(custom, ns, api.PLURAL_LLMSERVICES, "chat").get("status") or {}
            return status if status.get("readyReplicas") == 1 else None

        wait_for(ready_replicas, "the service to count its replica ready", 60)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": "smol", "temperature": 0, "messages": question}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."

        # A long request in flight while the replica is deleted: it drains, so it is unready
        # (its /health says 503) while the request finishes, then it exits 0.
        long = {**body, "max_tokens": 96, "ignore_eos": True}
        result: dict[str, Any] = {}
        client = threading.Thread(target=lambda: result.update(reply=httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=long, timeout=120)))  # fmt: skip
        client.start()
        time.sleep(1.0)
        core.delete_namespaced_pod(pod.metadata.name, ns)
        wait_for(lambda: not server.ready or None, "the draining replica to turn unready", 30)
        client.join(120)
        assert result["reply"].status_code == 200
        assert result["reply"].json()["choices"][0]["finish_reason"] == "length"
        assert server.wait_exit(60) == 0, server.tail()

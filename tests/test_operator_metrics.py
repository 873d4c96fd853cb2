"""The operator's metrics as Prometheus reads them, after reconciles against the in-memory API:
LLMService replicas and served ratio, LLMBatchJob workers by phase, preemptions and goodput,
and series that go with their object."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client import generate_latest

from tests.test_operator import FakeClock, MemoryKube, job_obj, service_obj
from tidal.operator.metrics import DEFAULT_PORT, Ledger, OperatorMetrics, serve_metrics
from tidal.operator.reconciler import Reconciler
from tidal.operator.run import OperatorOptions
from tidal.operator.spec import observe_pod

NOW = "2026-11-23T12:00:00"


def lines(metrics: OperatorMetrics, name: str) -> list[str]:
    """The exposition's sample lines of metric ``name``, in order."""
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if line.partition("{")[0] == name]


def run(pod: dict[str, Any], started: str, finished: str | None = None) -> None:
    """Mark ``pod`` running since ``started`` (its one container), or finished at ``finished``
    with the phase the caller sets."""
    state: dict[str, Any] = {"running": {"startedAt": started}}
    if finished is not None:
        state = {"terminated": {"startedAt": started, "finishedAt": finished, "exitCode": 0}}
    pod["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "worker", "state": state}],
    }


def test_service_replicas_and_served_ratio_follow_each_reconcile_and_go_with_it() -> None:
    kube = MemoryKube(service_obj(3))
    reconciler = Reconciler(kube, FakeClock(NOW))
    metrics = reconciler.metrics
    reconciler.reconcile("LLMService", "ns", "chat")  # three pods created, none ready
    assert lines(metrics, "tidal_llmservice_replicas") == [
        'tidal_llmservice_replicas{name="chat",namespace="ns",state="desired"} 3.0',
        'tidal_llmservice_replicas{name="chat",namespace="ns",state="ready"} 0.0',
    ]
    assert lines(metrics, "tidal_llmservice_served_ratio") == [
        'tidal_llmservice_served_ratio{name="chat",namespace="ns"} 0.0'
    ]
    for name in ("chat-0", "chat-1"):
        run(kube.pods[name], "2026-11-23T11:00:00Z")
    reconciler.reconcile("LLMService", "ns", "chat")
    assert 'tidal_llmservice_replicas{name="chat",namespace="ns",state="ready"} 2.0' in lines(
        metrics, "tidal_llmservice_replicas"
    )
    assert lines(metrics, "tidal_llmservice_served_ratio") == [
        'tidal_llmservice_served_ratio{name="chat",namespace="ns"} 0.6666666666666666'
    ]
    kube.set_replicas("ns", "chat", 0)  # nothing desired: fully served
    reconciler.reconcile("LLMService", "ns", "chat")
    assert lines(metrics, "tidal_llmservice_served_ratio") == [
        'tidal_llmservice_served_ratio{name="chat",namespace="ns"} 1.0'
    ]
    del kube.objects[("LLMService", "chat")]
    reconciler.reconcile("LLMService", "ns", "chat")
    assert lines(metrics, "tidal_llmservice_replicas") == []
    assert lines(metrics, "tidal_llmservice_served_ratio") == []


def workers(metrics: OperatorMetrics) -> dict[str, float]:
    """tidal_llmbatchjob_workers of ns/job by phase."""
    out = {}
    for line in lines(metrics, "tidal_llmbatchjob_workers"):
        labels, value = line.rsplit(" ", 1)
        assert 'name="job",namespace="ns"' in labels
        out[labels.split('phase="')[1].split('"')[0]] = float(value)
    return out


def test_batch_workers_preemptions_and_goodput_after_each_reconcile() -> None:
    """Two workers of 2 GPUs (tensorParallel 2). Worker 0 runs 10 minutes, is preempted and
    checkpoints on its way out: 2 x 600 GPU-seconds kept. Worker 1 succeeds after 15
    minutes: 2 x 900 more. Its second attempt, preempted before it wrote a checkpoint of its
    own, keeps nothing."""
    kube = MemoryKube(job_obj(2))
    reconciler = Reconciler(kube, FakeClock(NOW))
    metrics = reconciler.metrics
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    zero = dict.fromkeys(("Pending", "Running", "Waiting", "Succeeded", "Failed"), 0.0)
    assert workers(metrics) == {**zero, "Pending": 2.0}
    assert lines(metrics, "tidal_llmbatchjob_preemptions") == [
        'tidal_llmbatchjob_preemptions{name="job",namespace="ns"} 0.0'
    ]
    goodput = "tidal_batch_goodput_gpu_seconds_total"
    assert lines(metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 0.0']
    for name in ("job-0-1", "job-1-1"):
        run(kube.pods[name], "2026-11-23T11:00:00Z")
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    assert workers(metrics) == {**zero, "Running": 2.0}
    # Worker 0 is evicted; its last watch event: exit 143 after its checkpoint.
    evicted = kube.pods.pop("job-0-1")
    run(evicted, "2026-11-23T11:00:00Z", finished="2026-11-23T11:10:00Z")
    evicted["status"]["phase"] = "Failed"
    evicted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    evicted["metadata"]["annotations"]["tidal.dev/checkpoint"] = "s3://out/ckpt/0/step-3"
    reconciler.reconcile("LLMBatchJob", "ns", "job", gone=[evicted])
    assert workers(metrics) == {**zero, "Running": 1.0, "Waiting": 1.0}  # job-0-2 created
    assert lines(metrics, "tidal_llmbatchjob_preemptions") == [
        'tidal_llmbatchjob_preemptions{name="job",namespace="ns"} 1.0'
    ]
    assert lines(metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 1200.0']
    # The same deletion seen again (a repeated watch event) is not counted twice.
    reconciler.reconcile("LLMBatchJob", "ns", "job", gone=[evicted])
    assert lines(metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 1200.0']
    assert workers(metrics) == {**zero, "Running": 1.0, "Pending": 1.0}
    # Worker 1 succeeds; its pod stays, and is counted once.
    done = kube.pods["job-1-1"]
    run(done, "2026-11-23T11:00:00Z", finished="2026-11-23T11:15:00Z")
    done["status"]["phase"] = "Succeeded"
    for _ in range(2):
        reconciler.reconcile("LLMBatchJob", "ns", "job")
    assert workers(metrics) == {**zero, "Pending": 1.0, "Succeeded": 1.0}
    assert lines(metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 3000.0']
    # Worker 0's second attempt runs 5 minutes and vanishes (no event seen, no checkpoint).
    run(kube.pods["job-0-2"], "2026-11-23T11:20:00Z")
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    del kube.pods["job-0-2"]
    reconciler.reconcile("LLMBatchJob", "ns", "job")
    assert lines(metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 3000.0']
    assert lines(metrics, "tidal_llmbatchjob_preemptions") == [
        'tidal_llmbatchjob_preemptions{name="job",namespace="ns"} 2.0'
    ]
    # A restarted operator counts from its start: the succeeded pod it finds is not counted.
    restarted = Reconciler(kube, FakeClock(NOW))
    restarted.reconcile("LLMBatchJob", "ns", "job")
    assert lines(restarted.metrics, goodput) == [f'{goodput}{{name="job",namespace="ns"}} 0.0']
    assert 'tidal_llmbatchjob_preemptions{name="job",namespace="ns"} 2.0' in lines(
        restarted.metrics, "tidal_llmbatchjob_preemptions"
    )
    # The job is deleted: the finalizer's cleanup takes its series.
    reconciler.cleanup("LLMBatchJob", "ns", "job", "job-uid")
    for name in ("tidal_llmbatchjob_workers", "tidal_llmbatchjob_preemptions", goodput):
        assert lines(metrics, name) == []


def test_a_worker_pods_running_time_is_its_containers() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "job-0-1", "labels": {}, "annotations": {}}}
    run(pod, "2026-11-23T11:00:00Z", finished="2026-11-23T11:10:00Z")
    seen = observe_pod(pod)
    assert seen.finished_at is not None and seen.started_at is not None
    assert seen.finished_at - seen.started_at == 600.0
    run(pod, "2026-11-23T11:00:00Z")
    assert observe_pod(pod).finished_at is None  # still running
    pod["status"] = {"phase": "Pending"}
    assert (observe_pod(pod).started_at, observe_pod(pod).finished_at) == (None, None)


def test_an_attempt_found_finished_at_the_first_reconcile_sets_the_baseline() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "job-0-1", "uid": "a", "labels": {}}}
    run(pod, "2026-11-23T11:00:00Z", finished="2026-11-23T11:10:00Z")
    pod["status"]["phase"] = "Succeeded"
    finished = observe_pod(pod)
    ledger = Ledger()
    assert ledger.step([finished], [], {}, gpus=4, now=0.0) == 0.0
    assert ledger.step([finished], [], {}, gpus=4, now=0.0) == 0.0
    fresh = Ledger()
    assert fresh.step([], [finished], {}, gpus=4, now=0.0) == 2400.0  # a deletion seen now


def test_the_operator_serves_its_metrics_on_its_port() -> None:
    assert OperatorOptions().metrics_port == DEFAULT_PORT == 9403
    metrics = OperatorMetrics()
    metrics.service("ns", "chat", 2, {"readyReplicas": 1})
    server = serve_metrics(metrics, 0, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'tidal_llmservice_served_ratio{name="chat",namespace="ns"} 0.5' in text
    assert "# HELP tidal_batch_goodput_gpu_seconds_total" in text

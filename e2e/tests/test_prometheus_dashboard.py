"""The dashboard "tidal: GPU pool" against a real Prometheus (Debian's package; E2E: the real
control plane with tidal's extender and operator, a fake node agent, a real worker).

Prometheus scrapes every component the dashboard reads, as the chart's monitors name them:
the extender (job tidal-extender, honouring the target's labels), kube-scheduler (job
tidal-scheduler, on its secure port with a ServiceAccount's token), the operator
(tidal-operator), the node agent (tidal-node-agent) and the LLMService replica's worker
(tidal-worker: `tidal worker serve` with SmolLM2 on CPU, run as a local process by
``e2e/pod_process.py``). Then a preemption scenario on one DGX-1V (NVLink quads {0,1,2,3} and
{4,5,6,7}) whose node agent reports GPU 7 fallen off the bus:

1. a pod bound to the dead GPU 7 with an unreadable ``tidal.dev/checkpoint-interval-seconds``
   (the extender counts an object problem);
2. an LLMBatchJob's seven TP1 workers fill every other GPU (KWOK runs them);
3. an LLMService's TP4 replica needs a whole NVLink quad: the only one is {0,1,2,3}, so four
   batch workers are preempted (kube-scheduler's preempt call, the extender's plan); their
   next attempts wait;
4. a second LLMService ("chat", TP1, the real worker) preempts one more batch worker; the device
   plugin's Allocate hands it its GPU (as the kubelet admits it), the worker loads SmolLM2 with
   a KV cache of 11 blocks, and two concurrent completions overflow it (a sequence preempted to
   recompute), a third repeats a prompt (the prefix cache);
5. a malformed filter call (answered 400);
6. the TP4 service scales to zero and four waiting batch workers get its quad (binds of label
   sets Prometheus saw before: ``increase()`` misses a counter's first appearance, so the
   aligned-share panels need a second bind of one set).

Every panel target of the dashboard the chart ships (``tidal.dashboards``) is then queried with
Grafana's variables filled in (the node, the test's namespace, the model, the scheduler job;
``$__rate_interval`` 30s): range targets over the whole scenario, as a timeseries panel asks,
instant ones now, as a stat or table does. Each must return a series with a number (not NaN);
a target that cannot in any scenario would be listed in EXEMPT with why (none is), and must still be
valid queries that return nothing. Every scrape target must be up.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from kubernetes import client

from e2e.helpers import (
    NodeAgent,
    claim_model_volume,
    fresh_namespace,
    model_spec,
    model_volume,
    run_pod,
    running_cluster,
    wait_for,
)
from e2e.prometheus import Prometheus, PrometheusError, ScrapeTarget, prometheus_or_skip
from tests.kubelet_double import KubeletDouble
from tidal import api, dashboards
from tidal.devcluster import LocalCluster
from tidal.devcluster.nodes import gpu_pod, node_names
from tidal.devcluster.process import free_port
from tidal.node_agent.deviceplugin.v1beta1 import api_pb2 as plugin_api

NODES = node_names(1, ["dgx1-v100"], prefix="prom")  # 8 GPUs, NVLink quads
NODE, PRESET = NODES[0]
DEAD_GPU = 7
MODEL_NAME = "smol"  # model_spec's served name: the workers' model_name label
SCHEDULER_JOB = dashboards.VARIABLE_SAMPLES["$scheduler_job"]  # the chart's job name
# SmolLM2-135M in float32: 30 layers x 3 KV heads x 64 x 2 (K, V) x 4 bytes per token, blocks
# of 16 tokens. 6 blocks hold max_model_len 80, and two chat prompts (~36 tokens, 3 blocks
# each), but not both once they grow past 48 tokens: one is preempted to recompute.
KV_BLOCKS = 6
KV_BLOCK_BYTES = 30 * 3 * 64 * 2 * 4 * 16
MAX_MODEL_LEN = 80
MAX_TOKENS = 16
GRAFANA = {  # a value for each of the dashboard's variables
    "$__rate_interval": "30s",
    "$__range": "15m",  # longer than the test: every bind and preemption in range
    "$node": NODE,
    "$namespace": "",  # the test's namespace (set per test)
    "$model_name": MODEL_NAME,
    "$scheduler_job": SCHEDULER_JOB,
}
# (panel title, refId) -> why no scenario gives it data. Kept short; each is checked to be a
# valid query that returns nothing, so an entry that gains data fails until it is removed.
EXEMPT: dict[tuple[str, str], str] = {}  # (panel, target ref) -> why it cannot have data
_METRIC = re.compile(r"\b(?:tidal|scheduler)_[a-z0-9_]+\b")


# -- the cluster, the node agent, the namespace -----------------------------------------------


@pytest.fixture(scope="module")
def prom_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    prometheus_or_skip()  # before minutes of control plane
    yield from running_cluster(
        tmp_path_factory.mktemp("prometheus-cluster"), NODES,
        controller_manager=True, run_extender=True, run_operator=True,
    )  # fmt: skip


@pytest.fixture
def cluster(prom_cluster: LocalCluster) -> LocalCluster:
    """Named `cluster` so a failure report carries the control-plane logs."""
    return prom_cluster


@pytest.fixture(scope="module")
def agent(prom_cluster: LocalCluster) -> Iterator[tuple[NodeAgent, KubeletDouble]]:
    """The node's agent serving the preset, GPU 7 unhealthy from the start, its device plugin
    registered with a kubelet double."""
    health = prom_cluster.workdir / "node-agent-health"
    health.write_text(f"{DEAD_GPU} XID 79 (GPU has fallen off the bus)\n")
    # unix socket paths must stay short: a directory under /tmp, not pytest's
    with tempfile.TemporaryDirectory(prefix="tidal-dp-") as sockets:
        kubelet = KubeletDouble(Path(sockets))
        kubelet.start()
        log = prom_cluster.log_dir / f"node-agent-{NODE}.log"
        args = ["--fake", PRESET, "--fake-health", str(health)]
        node_agent = NodeAgent(NODE, args, log, Path(sockets), free_port())
        node_agent.start(prom_cluster.kubeconfig)
        try:
            wait_for(lambda: kubelet.requests, "the device plugin to register", 60)
            yield node_agent, kubelet
        finally:
            node_agent.stop()
            if kubelet.server is not None:
                kubelet.server.stop(0)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("pvc")
    return root, model_volume(root)


@pytest.fixture
def ns(core: Any, volume: tuple[Path, str]) -> Iterator[str]:
    for name in fresh_namespace(core, "prom"):
        claim_model_volume(core, name, volume[0])
        yield name


# -- what Prometheus scrapes ------------------------------------------------------------------


def flag(cluster: LocalCluster, component: str, name: str) -> str:
    """The value of ``--name=`` on a component's command line."""
    prefix = f"--{name}="
    argv = cluster.components[component].argv
    return next(a.removeprefix(prefix) for a in argv if a.startswith(prefix))


def scrape_token(cluster: LocalCluster, path: Path) -> Path:
    """A token of ServiceAccount monitoring/prometheus, allowed GET /metrics (what the chart's
    ServiceMonitor sends kube-scheduler: Prometheus' own token), written to ``path``."""
    role = "tidal-e2e-prometheus"
    account = {"kind": "ServiceAccount", "name": "prometheus", "namespace": "monitoring"}
    cluster.create_objects([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "prometheus", "namespace": "monitoring"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": role},
         "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": role}, "subjects": [account],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": role}},
    ])  # fmt: skip
    core = client.CoreV1Api(cluster.api_client())
    request = {"spec": {"expirationSeconds": 86400}}
    token = core.create_namespaced_service_account_token("prometheus", "monitoring", request)
    path.write_text(token.status.token)
    return path


def scrape_targets(
    cluster: LocalCluster, node_agent: NodeAgent, worker_port: int, tmp: Path
) -> list[ScrapeTarget]:
    assert cluster.options.extender is not None
    extender = urllib.parse.urlsplit(cluster.options.extender.url_prefix).netloc
    scheduler = flag(cluster, "kube-scheduler", "secure-port")
    operator = flag(cluster, "tidal-operator", "metrics-port")
    token = scrape_token(cluster, tmp / "prometheus.token")
    return [
        # honour the labels: the extender's and operator's namespace/pod name the workload
        ScrapeTarget("tidal-extender", extender, honor_labels=True),
        # kube-scheduler's secure port; its serving certificate is self-signed
        ScrapeTarget(
            SCHEDULER_JOB,
            f"127.0.0.1:{scheduler}",
            scheme="https",
            bearer_token_file=token,
            insecure_skip_verify=True,
        ),
        ScrapeTarget("tidal-operator", f"127.0.0.1:{operator}", honor_labels=True),
        ScrapeTarget("tidal-node-agent", f"127.0.0.1:{node_agent.metrics_port}"),
        ScrapeTarget("tidal-worker", f"127.0.0.1:{worker_port}"),
    ]


# -- the scenario's objects -------------------------------------------------------------------


def unreadable_pod() -> dict[str, Any]:
    """Bound to the dead GPU at creation, with a checkpoint interval nobody can read."""
    notes = {api.ANNOTATION_GPUS: str(DEAD_GPU), api.ANNOTATION_CHECKPOINT_INTERVAL: "soon"}
    pod = gpu_pod("unreadable", 1, annotations=notes)
    pod["spec"]["nodeName"] = NODE
    pod["spec"]["priorityClassName"] = api.PRIORITY_CLASS_ONLINE  # nobody's victim
    return pod


def batch_job(tmp: Path, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND_LLMBATCHJOB,
        "metadata": {"name": "fill"},
        "spec": {"model": {"name": "bulk", "uri": "hf://org/bulk"}, "tensorParallel": 1,
                 "parallelism": workers, "input": {"uri": f"file://{tmp}/in"},
                 "output": {"uri": f"file://{tmp}/out"}, "checkpointIntervalSeconds": 30,
                 "resources": {"cpu": "1", "memory": "1Gi"}},
    }  # fmt: skip


def service(name: str, model: dict[str, Any], tp: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND_LLMSERVICE, "metadata": {"name": name},
        "spec": {"model": model, "tensorParallel": tp, "replicas": 1,
                 "resources": {"cpu": "1", "memory": "1Gi"}, **spec},
    }  # fmt: skip


def create(custom: Any, ns: str, plural: str, body: dict[str, Any]) -> None:
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, plural, body)


def bound_pods(core: Any, ns: str, label: str, name: str) -> list[Any]:
    pods = core.list_namespaced_pod(ns, label_selector=f"{label}={name}").items
    return [p for p in pods if p.spec.node_name and not p.metadata.deletion_timestamp]


def gpus_of(pod: Any) -> list[int]:
    return list(api.parse_gpu_list(pod.metadata.annotations[api.ANNOTATION_GPUS]))


def allocate(
    core: Any, kubelet: KubeletDouble, uuids: list[str]
) -> Callable[[dict[str, Any]], Mapping[str, str]]:
    """The kubelet's admission of a bound pod: Allocate of the devices of its GPUs, while it is
    Pending on the node; the plugin's environment for the container."""

    def admit(pod: dict[str, Any]) -> Mapping[str, str]:
        name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
        annotated = wait_for(
            lambda: core.read_namespaced_pod(name, ns).metadata.annotations.get(
                api.ANNOTATION_GPUS
            ),
            f"pod {name}'s {api.ANNOTATION_GPUS}",
            30,
        )
        gpus = api.parse_gpu_list(annotated)
        request = plugin_api.ContainerAllocateRequest(devices_ids=[uuids[g] for g in gpus])
        answer = kubelet.plugin("tidal-gpu.sock").Allocate(
            plugin_api.AllocateRequest(container_requests=[request]), timeout=10
        )
        env = dict(answer.container_responses[0].envs)
        assert env["TIDAL_GPU_IDS"] == annotated, env
        return env

    return admit


def chat(port: int, content: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=180)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def worker_sample(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + "{")]
    return sum(values)


def bad_filter_call(cluster: LocalCluster) -> int:
    assert cluster.options.extender is not None
    request = urllib.request.Request(
        f"{cluster.options.extender.url_prefix}/filter", data=b"{not json",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# -- the dashboard's queries ------------------------------------------------------------------


def panel_targets(board: dict[str, Any]) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """((panel title, refId), target) of every panel query."""
    return [
        ((panel["title"], t["refId"]), t)
        for panel in dashboards.panels_of(board)
        for t in panel.get("targets", [])
    ]


def as_promql(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's variables replaced (longest names first), as dashboards.as_promql does."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", values[name]).replace(name, values[name])
    assert "$" not in expr, expr
    return expr


def numbers(series: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant vector or a matrix."""
    samples = [s["value"] for s in series if "value" in s]
    samples += [v for s in series for v in s.get("values", ())]
    return [x for x in (float(v) for _, v in samples) if not math.isnan(x)]


def evaluate(prometheus: Prometheus, target: dict[str, Any], expr: str) -> list[dict[str, Any]]:
    """What the panel would get: an instant query now, or a range over the whole scenario."""
    if target["instant"]:
        return prometheus.query(expr)
    return prometheus.query_range(expr, prometheus.started_at, time.time(), 1.0)


def why_empty(prometheus: Prometheus, expr: str, series: list[dict[str, Any]]) -> str:
    """What Prometheus holds of each metric the expression reads."""
    got = f"{len(series)} series, all NaN" if series else "no series"
    held = []
    for name in sorted(set(_METRIC.findall(expr))):
        found = prometheus.query(f"count({name})")
        held.append(f"{name}: {int(float(found[0]['value'][1])) if found else 0} series")
    return f"{got} ({'; '.join(held)})"


def wait_for_every_panel(
    prometheus: Prometheus, values: Mapping[str, str], timeout_s: float
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Poll until every target not exempt has data; fail naming those without and why."""
    board = dashboards.dashboard()
    queries = {key: (t, as_promql(t["expr"], values)) for key, t in panel_targets(board)}
    assert set(EXEMPT) <= set(queries), f"stale EXEMPT entries: {set(EXEMPT) - set(queries)}"
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing = [key for key in queries if key not in EXEMPT]
    deadline = time.monotonic() + timeout_s
    while True:
        for key in list(missing):
            target, expr = queries[key]
            results[key] = evaluate(prometheus, target, expr)
            if numbers(results[key]):
                missing.remove(key)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    report = [
        f"  {key[0]!r} {key[1]}: {why_empty(prometheus, queries[key][1], results[key])}"
        f"\n    {queries[key][1]}"
        for key in missing
    ]
    assert not missing, f"{len(missing)} of {len(queries)} dashboard queries without data:\n" + (
        "\n".join(report)
    )
    for key, reason in EXEMPT.items():
        target, expr = queries[key]
        try:
            series = evaluate(prometheus, target, expr)
        except PrometheusError as error:
            raise AssertionError(f"exempt {key} is no valid query: {error}") from error
        assert not numbers(series), f"exempt {key} ({reason}) has data now: drop the exemption"
    return results


# -- the test ---------------------------------------------------------------------------------


def test_every_dashboard_panel_has_data_in_a_preemption_scenario(
    cluster: LocalCluster, core: Any, custom: Any, ns: str, tmp_path: Path,
    volume: tuple[Path, str], agent: tuple[NodeAgent, KubeletDouble],
) -> None:  # fmt: skip
    node_agent, kubelet = agent
    root, uri = volume
    port = free_port()
    targets = scrape_targets(cluster, node_agent, port, tmp_path)
    with Prometheus(targets, tmp_path / "prometheus").start() as prometheus:
        # The extender knows the node's published topology and its dead GPU.
        known = 'max(tidal_extender_cache_objects{kind="unhealthy_gpus"}) == 1'
        wait_for(lambda: numbers(prometheus.query(known)), "the extender to count the dead GPU", 60)
        core.create_namespaced_pod(ns, unreadable_pod())
        # Low tide: batch workers on every other GPU.
        create(custom, ns, api.PLURAL_LLMBATCHJOBS, batch_job(tmp_path, 7))
        wait_for(lambda: len(bound_pods(core, ns, api.LABEL_LLMBATCHJOB, "fill")) == 7,
                 "seven batch workers bound", 90)  # fmt: skip
        # The tide comes in: a TP4 replica on the one whole NVLink quad.
        big = {"name": "big", "uri": "hf://org/big"}
        create(custom, ns, api.PLURAL_LLMSERVICES, service("peak", big, 4))
        (peak,) = wait_for(lambda: bound_pods(core, ns, api.LABEL_LLMSERVICE, "peak"),
                           "the TP4 replica bound", 120)  # fmt: skip
        assert gpus_of(peak) == [0, 1, 2, 3]
        # One more online replica, the real worker, with a KV cache too small for two requests.
        kv_bytes = KV_BLOCKS * KV_BLOCK_BYTES
        args = [f"--max-model-len={MAX_MODEL_LEN}", f"--kv-cache-memory={kv_bytes}"]
        create(custom, ns, api.PLURAL_LLMSERVICES,
               service("chat", model_spec(uri), 1, port=port, args=args))  # fmt: skip
        pod = wait_for(
            lambda: core.list_namespaced_pod(ns, label_selector=f"{api.LABEL_LLMSERVICE}=chat")
            .items, "the chat replica", 60,
        )[0]  # fmt: skip
        uuids = [
            d["uuid"]
            for d in custom.get_cluster_custom_object(
                api.GROUP, api.VERSION, api.PLURAL_GPUTOPOLOGIES, NODE
            )["status"]["devices"]
        ]
        admit = allocate(core, kubelet, uuids)
        with run_pod(cluster, core, ns, pod.metadata.name, tmp_path, root, admit) as worker:
            worker.wait_ready(240)
            assert f"KV cache: {KV_BLOCKS} blocks" in worker.log_text(), worker.tail()
            # Two at once overflow the cache: one is preempted and recomputed.
            replies: list[dict[str, Any]] = []
            threads = [
                threading.Thread(target=lambda c=c: replies.append(chat(port, c, MAX_TOKENS)))
                for c in ("Count from one to fifty.", "Name every planet you know.")
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(240)
            assert len(replies) == 2, worker.tail()
            assert worker_sample(port, "tidal_num_preemptions_total") > 0, worker.tail()
            chat(port, "Count from one to fifty.", 4)  # the same prompt: the prefix cache
            assert bad_filter_call(cluster) == 400
            # The tide goes out: the TP4 replica goes, four waiting batch workers get its quad
            # (binds of a label set seen before, which increase() counts).
            scale = {"spec": {"replicas": 0}}
            custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL_LLMSERVICES, "peak", scale
            )
            # 7 - 4 - 1 preempted, + 4 on the freed quad
            wait_for(lambda: len(bound_pods(core, ns, api.LABEL_LLMBATCHJOB, "fill")) == 6,
                     "batch workers on the freed quad", 90)  # fmt: skip

            values = {**GRAFANA, "$namespace": ns}
            assert set(values) == set(dashboards.VARIABLE_SAMPLES), "a new dashboard variable"
            results = wait_for_every_panel(prometheus, values, 90)
            # What the variables' label_values queries offer includes what was filled in.
            for variable in dashboards.dashboard()["templating"]["list"]:
                if variable["type"] == "query":
                    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
                    assert match, variable["definition"]
                    offered = prometheus.label_values(match.group(2), match.group(1))
                    assert values["$" + variable["name"]] in offered, (variable["name"], offered)
            prometheus.wait_targets_up(30)

    # The scenario shows on the panels as it happened.
    assert numbers(results[("GPUs", "A")]) == [8.0]
    assert numbers(results[("Unhealthy GPUs", "A")]) == [1.0]
    (dead,) = results[("Unhealthy GPUs by node", "A")]
    assert (dead["metric"]["node"], dead["metric"]["gpu"]) == (NODE, str(DEAD_GPU))
    holders = {s["metric"]["pod"] for s in results[("Allocations", "A")]}
    assert pod.metadata.name in holders and any(h.startswith("fill-") for h in holders), holders

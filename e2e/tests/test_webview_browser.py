"""tidal's web view in a real headless browser (Debian's chromium-headless-shell), after a
preemption on the real control plane: the page the extender serves draws every node, colours
each GPU by what holds it, and lists the preemption with its victims and the pod still waiting.

With ``TIDAL_SCREENSHOT_DIR`` set, the screenshot is also saved there (the README's picture is
made so: ``TIDAL_SCREENSHOT_DIR=docs/images pytest e2e/tests/test_webview_browser.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from PIL import Image

from e2e.helpers import fresh_namespace, running_cluster, wait_for
from tidal import api
from tidal.devcluster import LocalCluster
from tidal.devcluster.nodes import gpu_pod, node_names
from tidal.webview.snapshot import COLOURS

NODES = node_names(3, ["dgx1-v100"], prefix="view")
BROWSER = "chromium-headless-shell"
WINDOW = (1280, 720)


@pytest.fixture(scope="module")
def browser() -> str:
    path = shutil.which(BROWSER)
    if path is None:
        if os.environ.get("TIDAL_E2E") == "require":
            pytest.fail(f"{BROWSER} not found: e2e/build.sh installs it (as root)")
        pytest.skip(f"{BROWSER} not installed")
    return path


@pytest.fixture(scope="module")
def view_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("webview-cluster"),
        NODES,
        {api.PRIORITY_CLASS_BATCH: 10, api.PRIORITY_CLASS_ONLINE: 1000},
        controller_manager=True,
        run_extender=True,
    )


def batch(name: str, node: str, gpus: list[int]) -> dict[str, Any]:
    """A batch worker already running on ``node`` on exactly ``gpus`` (as tidal binds one)."""
    pod = gpu_pod(name, len(gpus), annotations={api.ANNOTATION_GPUS: ",".join(map(str, gpus))})
    pod["spec"]["priorityClassName"] = api.PRIORITY_CLASS_BATCH
    pod["spec"]["nodeName"] = node
    return pod


def online(name: str, gpus: int, node: str | None = None) -> dict[str, Any]:
    notes = {api.ANNOTATION_TOPOLOGY_MODE: "guaranteed", api.ANNOTATION_TOPOLOGY_TIER: "nvlink"}
    pod = gpu_pod(name, gpus, annotations=notes)
    pod["spec"]["priorityClassName"] = api.PRIORITY_CLASS_ONLINE
    if node:
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    return pod


def snapshot(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/dashboard/snapshot.json", timeout=10) as response:
        body: dict[str, Any] = json.load(response)
    return body


def preemption_scenario(core: Any, ns: str) -> None:
    """view-0: an online pod on one NVLink quad. view-1: batch on 0,1,4,5 (four GPUs free by
    count, no free quad), then a guaranteed 4-GPU online pod pinned there: the extender evicts
    the two batch pods of one quad. view-2: batch on 0-3. An 8-GPU batch pod then finds no node
    and waits (batch work preempts no one of its own priority)."""
    (a, _), (b, _), (c, _) = NODES
    core.create_namespaced_pod(ns, online("chat-0", 4, a))
    for i, gpu in enumerate((0, 1, 4, 5)):
        core.create_namespaced_pod(ns, batch(f"job-{i}", b, [gpu]))
    core.create_namespaced_pod(ns, batch("job-wide", c, [0, 1, 2, 3]))
    wait_for(
        lambda: all(p.status.phase == "Running" for p in core.list_namespaced_pod(ns).items),
        "the first pods to run",
    )
    core.create_namespaced_pod(ns, online("chat-1", 4, b))
    wait_for(lambda: core.read_namespaced_pod("chat-1", ns).spec.node_name, "chat-1 to be bound")
    wide = gpu_pod("job-big", 8)
    wide["spec"]["priorityClassName"] = api.PRIORITY_CLASS_BATCH
    core.create_namespaced_pod(ns, wide)


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class Page(HTMLParser):
    """The page's node sections, GPU cells, and the text of its status, preemption and pending
    entries, from the DOM the browser built (serialised with every end tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[str] = []
        self.gpus: list[dict[str, str]] = []
        self.texts: dict[str, list[str]] = {"status": [], "preemption": [], "pending": []}
        self._open: list[str | None] = []  # per open element: the text it collects, if any

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        classes = found.get("class", "").split()
        if tag == "div" and "gpu" in classes:
            self.gpus.append(found)
        if tag == "section" and "node" in classes:
            self.nodes.append(found["data-node"])
        kind = "status" if found.get("id") == "status" else None
        if tag == "li":
            kind = next((k for k in ("preemption", "pending") if k in classes), None)
        if kind:
            self.texts[kind].append("")
        if tag not in VOID:
            self._open.append(kind)

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for kind in {k for k in self._open if k}:
            self.texts[kind][-1] += data


def dump_dom(browser: str, url: str) -> Page:
    page = Page()
    page.feed(run_browser(browser, "--dump-dom", url).stdout)
    return page


def run_browser(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start. The virtual
    # time budget lets the page's fetch and first draw finish before the DOM is read.
    argv = [browser, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def rgb(hex_colour: str) -> tuple[int, int, int]:
    value = int(hex_colour.lstrip("#"), 16)
    return value >> 16, value >> 8 & 0xFF, value & 0xFF


def test_the_web_view_shows_a_preemption_in_a_real_browser(
    view_cluster: LocalCluster, browser: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(view_cluster.api_client())
    port = json.loads((view_cluster.workdir / "state.json").read_text())["ports"]["extender"]
    url = f"http://127.0.0.1:{port}"
    for ns in fresh_namespace(core, "view"):
        preemption_scenario(core, ns)
        live = wait_for(
            lambda: (s := snapshot(url))["preemptions"] and s["pending"] and s,
            "the preemption and the waiting pod in the snapshot",
        )
        (record,) = live["preemptions"]
        assert record["preemptor"] == f"{ns}/chat-1" and record["node"] == NODES[1][0]
        assert sorted(v["pod"] for v in record["victims"]) in (
            [f"{ns}/job-0", f"{ns}/job-1"],
            [f"{ns}/job-2", f"{ns}/job-3"],
        )

        page = dump_dom(browser, f"{url}/dashboard")
        assert page.texts["status"] == ["live"]
        assert page.nodes == [name for name, _ in NODES]
        by_cell = {(g["data-node"], int(g["data-gpu"])): g for g in page.gpus}
        assert len(by_cell) == 24
        for cell in page.gpus:
            assert f"background:{COLOURS[cell['data-colour']]}" in cell["style"].replace(" ", "")
        a, b, c = (name for name, _ in NODES)
        assert [by_cell[a, i]["data-colour"] for i in range(8)].count("online-guaranteed") == 4
        assert [by_cell[c, i]["data-colour"] for i in range(4)] == ["batch"] * 4
        # chat-1 holds (or, while its victims leave, has reserved) one whole quad of view-1
        colours_b = [by_cell[b, i]["data-colour"] for i in range(8)]
        assert colours_b.count("batch") == 2
        assert colours_b.count("online-guaranteed") + colours_b.count("reserved") == 4
        (entry,) = page.texts["preemption"]
        assert f"{ns}/chat-1" in entry and "job-" in entry and "victim GPUs 2" in entry
        assert any(f"{ns}/job-big" in text for text in page.texts["pending"])

        shot = tmp_path / "webview.png"
        run_browser(browser, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    f"{url}/dashboard")  # fmt: skip
        pixels = Image.open(shot).convert("RGB")
        assert pixels.size == WINDOW
        found = dict((colour, n) for n, colour in pixels.getcolors(WINDOW[0] * WINDOW[1]) or [])
        counts = {
            key: found.get(rgb(COLOURS[key]), 0) for key in ("free", "batch", "online-guaranteed")
        }
        assert all(count > 200 for count in counts.values()), counts  # cells drawn, not blank
        if target := os.environ.get("TIDAL_SCREENSHOT_DIR"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(target) / "webview.png")

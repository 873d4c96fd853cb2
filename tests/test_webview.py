"""tidal's web view (tidal.webview): the snapshot model and its JSON, the colour keys, and the
page, live and as a replay. The page's own JavaScript runs under node against a stand-in DOM
(the renderer builds HTML strings, so its output is parsed and checked here: the DOM contract,
the colours, the escaping of names from the cluster); a real browser runs it in e2e.
"""

from __future__ import annotations

import base64
import colorsys
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tidal.webview.page import content_security_policy, render_page, replay_document
from tidal.webview.snapshot import (
    COLOURS,
    LEGEND,
    STATES,
    GpuView,
    NodeView,
    PendingPod,
    PreemptionRecord,
    ReservationView,
    Snapshot,
    Victim,
    colour_key,
)

HOSTILE = "<img src=x onerror=alert(1)>"
SNAPSHOT_KEYS = {"version", "source", "time", "nodes", "reservations", "preemptions", "pending"}
GPU_KEYS = {"gpu", "state", "class", "tier", "namespace", "pod", "workload", "mode"}


def sample(time: float = 1_800_000_000.0, source: str = "extender") -> Snapshot:
    """Every colour key once, a hostile pod name, a reservation, a preemption, a pending pod."""
    node_a = NodeView(
        "node-a",
        (
            GpuView(0, "free"),
            GpuView(1, "batch", "batch", "", "ml", "job-0", "job"),
            GpuView(2, "online", "online", "nvlink", "web", "chat-0", "chat", "guaranteed"),
            GpuView(3, "online", "online", "nvlink", "web", "solo-0", "solo", "best-effort"),
        ),
    )
    node_b = NodeView(
        "node-<b>",
        (
            GpuView(0, "online", "other", "", "misc", HOSTILE, HOSTILE),
            GpuView(1, "reserved", "online", "nvlink", "web", "chat-1", "chat"),
            GpuView(2, "unhealthy"),
        ),
    )
    preemption = PreemptionRecord(
        time=time - 60,
        preemptor="web/chat-1",
        klass="online",
        tier="nvlink",
        node="node-<b>",
        victims=(Victim("ml/job-1", "batch", 2), Victim(f"ml/{HOSTILE}", "batch", 1)),
        victim_gpus=3,
        wasted_gpus=1,
        lost_gpu_seconds=5400.0,
    )
    return Snapshot(
        source=source,
        time=time,
        nodes=(node_a, node_b),
        reservations=(ReservationView("web/chat-1", "node-<b>", (1,)),),
        preemptions=(preemption,),
        pending=(PendingPod(f"web/{HOSTILE}", "no-plan", 125.0),),
    )


# -- the snapshot -------------------------------------------------------------------------------


def test_a_snapshot_is_versioned_json_with_totals_per_state() -> None:
    data = sample().to_json()
    assert set(data) == {*SNAPSHOT_KEYS, "totals"}
    assert (data["version"], data["source"]) == (1, "extender")
    assert data["totals"] == {"free": 1, "batch": 1, "online": 3, "reserved": 1, "unhealthy": 1}
    gpu = data["nodes"][0]["gpus"][1]
    assert gpu == {
        "gpu": 1,
        "state": "batch",
        "class": "batch",
        "tier": "",
        "namespace": "ml",
        "pod": "job-0",
        "workload": "job",
        "mode": "",
    }
    assert data["preemptions"][0]["victims"][0] == {"pod": "ml/job-1", "class": "batch", "gpus": 2}
    assert data["reservations"] == [{"preemptor": "web/chat-1", "node": "node-<b>", "gpus": [1]}]
    assert json.loads(json.dumps(data)) == data  # plain JSON types only


def test_a_gpu_state_outside_the_five_is_refused() -> None:
    with pytest.raises(ValueError, match="'busy' is not one of"):
        GpuView(0, "busy")
    assert Snapshot("extender", 0.0).totals() == dict.fromkeys(STATES, 0)


@pytest.mark.parametrize(
    ("gpu", "key"),
    [
        ({"state": "free"}, "free"),
        ({"state": "batch", "class": "batch"}, "batch"),
        ({"state": "online", "class": "online", "mode": "guaranteed"}, "online-guaranteed"),
        ({"state": "online", "class": "online", "mode": "best-effort"}, "online-best-effort"),
        ({"state": "online", "class": "online", "tier": "nvlink"}, "online-best-effort"),
        ({"state": "online", "class": "other", "tier": "nvlink"}, "other"),
        ({"state": "reserved", "class": "online", "tier": "nvlink"}, "reserved"),
        ({"state": "unhealthy", "class": "batch"}, "unhealthy"),
        ({"state": "sleeping"}, "other"),
        ({}, "other"),
    ],
)
def test_colour_keys(gpu: dict[str, Any], key: str) -> None:
    assert colour_key(gpu) == key


def test_the_palette_is_saturated_and_every_colour_far_from_the_others() -> None:
    assert set(COLOURS) == set(LEGEND)
    rgb = {}
    for key, colour in COLOURS.items():
        assert re.fullmatch(r"#[0-9a-f]{6}", colour), key
        rgb[key] = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
        _, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in rgb[key]))
        assert saturation > 0.6 and value > 0.5, key
    keys = sorted(rgb)
    for i, one in enumerate(keys):
        for other in keys[i + 1 :]:
            distance = sum((a - b) ** 2 for a, b in zip(rgb[one], rgb[other], strict=True)) ** 0.5
            assert distance > 80, (one, other)


# -- the page -----------------------------------------------------------------------------------


def blocks(page: str) -> tuple[str, Any, Any]:
    """The page's executable script, and its two JSON blocks parsed."""
    (code,) = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    config = re.search(r'<script type="application/json" id="config">(.*?)</script>', page, re.S)
    replay = re.search(r'<script type="application/json" id="replay">(.*?)</script>', page, re.S)
    assert config is not None and replay is not None
    return code, json.loads(config[1]), json.loads(replay[1])


def test_the_live_page_is_self_contained_and_read_only() -> None:
    page = render_page("dashboard/snapshot.json", None)
    code, config, replay = blocks(page)
    assert (config["mode"], config["snapshot_url"], config["refresh_ms"]) == (
        "live",
        "dashboard/snapshot.json",
        2000,
    )
    assert config["colours"] == COLOURS and replay is None
    assert "<h1>tidal: GPU pool</h1>" in page
    for needle in ("<form", "POST", "method=", "http://", "https://", "@import", "url(", " src="):
        assert needle not in page, needle
    assert "fetch(config.snapshot_url" in code  # its one request, a GET of the snapshot


def test_the_policy_allows_exactly_the_pages_script() -> None:
    page = render_page("snapshot.json", None)
    code, _, _ = blocks(page)
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    policy = content_security_policy()
    assert f"script-src 'sha256-{digest}';" in policy
    assert policy.startswith("default-src 'none';")
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)
    assert meta is not None and policy.startswith(meta[1])  # a meta tag cannot say frame-ancestors


def test_a_page_is_live_or_a_replay() -> None:
    with pytest.raises(ValueError, match="not both or neither"):
        render_page(None, None)
    with pytest.raises(ValueError, match="not both or neither"):
        render_page("snapshot.json", [])


def decoded(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The replay document's frames as the snapshots they were made from (the page's decoding,
    written again): rows carried forward, GPU kinds looked up."""
    rows: dict[int, list[int]] = {}
    frames = []
    for frame in document["frames"]:
        for index in frame["gone"]:
            del rows[index]
        rows.update({row[0]: row for row in frame["grid"]})
        nodes = [
            {
                "name": document["nodes"][index],
                "gpus": [
                    {"gpu": gpu, **dict(zip(GPU_KEYS_ORDER, document["kinds"][kind], strict=True))}
                    for gpu, kind in enumerate(rows[index][1:])
                ],
            }
            for index in sorted(rows)
        ]
        rest = {key: frame[key] for key in ("reservations", "preemptions", "pending", "totals")}
        frames.append(
            {"version": document["version"], "source": document["source"], "time": frame["time"]}
            | {"nodes": nodes}
            | rest
        )
    return frames


GPU_KEYS_ORDER = ("state", "class", "tier", "namespace", "pod", "workload", "mode")


def test_a_replay_embeds_its_frames_compactly_and_whole() -> None:
    first = sample(0.0, "simulator")
    changed = NodeView("node-a", (GpuView(0, "batch", "batch", "", "ml", "job-9", "job"),))
    second = Snapshot("simulator", 600.0, (changed,), (), (), ())
    third = Snapshot("simulator", 1200.0, (changed, first.nodes[1]), (), (), ())
    frames = [s.to_json() for s in (first, second, third)]
    page = render_page(None, frames)
    _, config, document = blocks(page)
    assert config["mode"] == "replay" and config["snapshot_url"] is None
    assert decoded(document) == frames
    assert document["nodes"] == ["node-a", "node-<b>"]
    # Only what changed travels: node-a in the second frame, node-<b> gone, then back.
    assert [[row[0] for row in f["grid"]] for f in document["frames"]] == [[0, 1], [0], [1]]
    assert [f["gone"] for f in document["frames"]] == [[], [1], []]
    # No name from a frame can close the JSON block or open a tag in it.
    block = page.split('id="replay">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and HOSTILE not in page


def test_replay_gpus_must_be_listed_by_index() -> None:
    frame = sample().to_json()
    frame["nodes"][0]["gpus"].reverse()
    with pytest.raises(ValueError, match="node node-a: GPUs must be listed by index"):
        replay_document([frame])


# -- the page's script, under node ------------------------------------------------------------

HARNESS = r"""
const vm = require("node:vm");
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const elements = {};
// The node grid's children, one per <section class="node">, as the page replaces them.
function grid() {
  let sections = [];
  const replaced = [];
  return {
    get innerHTML() { return sections.map((section) => section.outerHTML).join(""); },
    set innerHTML(html) {
      sections = html.split(/(?=<section class="node")/).filter(Boolean).map((outerHTML, i) => ({
        get outerHTML() { return outerHTML; },
        set outerHTML(html) { replaced.push(i); outerHTML = html; },
      }));
    },
    get children() { return sections; },
    replaced, hidden: false, textContent: "", className: "", max: "0",
  };
}
function element(id) {
  if (id === "nodes" && !(id in elements)) elements[id] = grid();
  if (!(id in elements)) {
    const listeners = {};
    elements[id] = {
      innerHTML: "", textContent: input.text[id] ?? "", hidden: input.hidden.includes(id),
      value: "0", max: "0", className: "", listeners,
      addEventListener(type, listener) { listeners[type] = listener; },
    };
  }
  return elements[id];
}
const totals = input.totals.map((name) => ({ dataset: { total: name }, textContent: "0" }));
const document = {
  getElementById: element,
  querySelectorAll: (selector) => (selector === "[data-total]" ? totals : []),
};
async function fetch(url, options) {
  requests.push({ url, options });
  if (input.fetch.error) throw new Error(input.fetch.error);
  const { status, body } = input.fetch;
  return { ok: status === 200, status, json: async () => body };
}
const requests = [];
const timers = { setTimeout: () => 0, setInterval: () => 1, clearInterval: () => {} };
vm.runInNewContext(input.code, { document, fetch, ...timers });
function state() {
  const out = { totals: {}, requests };
  for (const [id, e] of Object.entries(elements)) {
    const { innerHTML: html, textContent: text, hidden, max, className } = e;
    out[id] = { html, text, hidden, max, className, replaced: [...(e.replaced ?? [])] };
  }
  for (const t of totals) out.totals[t.dataset.total] = t.textContent;
  return out;
}
setImmediate(() => {
  const states = [state()];
  for (const frame of input.slide) {
    element("frame").value = String(frame);
    element("frame").listeners.input();
    states.push(state());
  }
  process.stdout.write(JSON.stringify(states));
});
"""


def run_page(
    page: str, tmp_path: Path, fetch: dict[str, Any] | None = None, slide: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    """Load ``page``'s script under node (``fetch``: what a fetch answers); the page's elements
    after it ran, then after each ``slide`` of the replay slider to a frame."""
    node = shutil.which("node")
    if node is None:
        message = "node not found: the page's script cannot run"
        if os.environ.get("TIDAL_E2E") == "require":
            pytest.fail(message)
        pytest.skip(message)
    code, _, _ = blocks(page)
    config = re.search(r'id="config">(.*?)</script>', page, re.DOTALL)
    replay = re.search(r'id="replay">(.*?)</script>', page, re.DOTALL)
    assert config is not None and replay is not None
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    payload = {
        "code": code,
        "text": {"config": config[1], "replay": replay[1]},
        "totals": re.findall(r'data-total="(\w+)"', page),
        "hidden": re.findall(r'id="(\w+)" hidden', page),
        "fetch": fetch or {"status": 500},
        "slide": list(slide),
    }
    result = subprocess.run(
        [node, str(harness)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    states: list[dict[str, Any]] = json.loads(result.stdout)
    return states


class Tree(HTMLParser):
    """Every element of an HTML fragment: (tag, attributes, text inside it)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.open: list[list[str]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        self.open.append(text)

    def handle_endtag(self, tag: str) -> None:
        self.open.pop()

    def handle_data(self, data: str) -> None:
        for text in self.open:
            text.append(data)

    def having(self, tag: str, klass: str) -> list[tuple[dict[str, str], str]]:
        return [
            (attrs, "".join(text))
            for name, attrs, text in self.elements
            if name == tag and klass in attrs.get("class", "").split()
        ]


def check_grid(html: str, snapshot: dict[str, Any]) -> None:
    """The DOM contract of the node grid, GPU by GPU."""
    tree = Tree(html)
    assert not [tag for tag, _, _ in tree.elements if tag in ("img", "b", "script")]
    sections = tree.having("section", "node")
    assert [attrs["data-node"] for attrs, _ in sections] == [n["name"] for n in snapshot["nodes"]]
    headings = [text for tag, _, text in tree.elements if tag == "h3"]
    assert ["".join(text) for text in headings] == [n["name"] for n in snapshot["nodes"]]
    cells = tree.having("div", "gpu")
    expected = [(node["name"], gpu) for node in snapshot["nodes"] for gpu in node["gpus"]]
    assert len(cells) == len(expected)
    for (attrs, _), (name, gpu) in zip(cells, expected, strict=True):
        key = colour_key(gpu)
        assert attrs["data-node"] == name
        assert attrs["data-gpu"] == str(gpu["gpu"])
        assert attrs["data-state"] == gpu["state"]
        assert attrs["data-colour"] == key
        assert attrs["style"] == f"background:{COLOURS[key]}"
        for field in ("pod", "workload", "class", "tier"):
            assert gpu[field] in attrs["title"]


def test_the_live_page_draws_the_snapshot_it_fetches(tmp_path: Path) -> None:
    snapshot = sample().to_json()
    page = render_page("dashboard/snapshot.json", None)
    (state,) = run_page(page, tmp_path, {"status": 200, "body": snapshot})
    assert [r["url"] for r in state["requests"]] == ["dashboard/snapshot.json"]
    assert state["requests"][0]["options"].get("method", "GET") == "GET"
    assert (state["status"]["text"], state["status"]["className"]) == ("live", "")
    assert state["updated"]["text"].startswith("last updated")
    assert state["totals"] == {k: str(v) for k, v in snapshot["totals"].items()}
    check_grid(state["nodes"]["html"], snapshot)
    # Every colour key is drawn once, and the legend names them all.
    cells = Tree(state["nodes"]["html"]).having("div", "gpu")
    assert sorted(attrs["data-colour"] for attrs, _ in cells) == sorted(COLOURS)
    legend = Tree(state["legend"]["html"]).elements
    assert [attrs["data-colour"] for tag, attrs, _ in legend if tag == "li"] == list(LEGEND)

    (preemption,) = Tree(state["preemptions"]["html"]).having("li", "preemption")
    assert preemption[0]["data-preemptor"] == "web/chat-1"
    assert f"ml/job-1 (batch, 2 GPUs), ml/{HOSTILE} (batch, 1 GPU)" in preemption[1]
    assert "victim GPUs 3, wasted GPUs 1, lost 1.50 GPU-hours" in preemption[1]
    (pending,) = Tree(state["pending"]["html"]).having("li", "pending")
    assert pending == (
        {"class": "pending", "data-pod": f"web/{HOSTILE}"},
        f"web/{HOSTILE}: no-plan, waiting 2 min 5 s",
    )
    (reservation,) = Tree(state["reservations"]["html"]).having("li", "reservation")
    assert reservation[0]["data-preemptor"] == "web/chat-1"
    assert "on node node-<b>: GPUs 1" in reservation[1]
    for region in ("preemptions", "pending", "reservations"):
        assert not [t for t, _, _ in Tree(state[region]["html"]).elements if t in ("img", "script")]


@pytest.mark.parametrize(
    ("fetch", "status"),
    [
        ({"status": 503}, "error: HTTP 503 from dashboard/snapshot.json"),
        ({"error": "Failed to fetch"}, "error: Failed to fetch"),
        ({"status": 200, "body": {"version": 2}}, "error: snapshot version 2, this page reads 1"),
    ],
)
def test_the_live_page_says_why_it_has_no_snapshot(
    tmp_path: Path, fetch: dict[str, Any], status: str
) -> None:
    (state,) = run_page(render_page("dashboard/snapshot.json", None), tmp_path, fetch)
    assert (state["status"]["text"], state["status"]["className"]) == (status, "error")
    assert "nodes" not in state  # nothing drawn


def test_the_replay_page_draws_any_frame_the_slider_picks(tmp_path: Path) -> None:
    first = sample(0.0, "simulator")
    node_b = first.nodes[1]
    serving = NodeView("node-a", (GpuView(0, "online", "online", "nvlink", "", "", "chat"),))
    healed = NodeView("node-<b>", (GpuView(0, "free"), GpuView(1, "free"), GpuView(2, "free")))
    frames = [
        first.to_json(),
        Snapshot("simulator", 600.0, (serving, node_b)).to_json(),
        Snapshot("simulator", 1200.0, (serving, healed)).to_json(),
        Snapshot(
            "simulator",
            87000.0,  # day 2, 00:10
            (serving,),
            pending=(PendingPod("job-7", "no-plan", 4000.0),),
        ).to_json(),
    ]
    states = run_page(render_page(None, frames), tmp_path, slide=(1, 2, 3, 0))
    opened, second, third, last, back = states
    assert opened["requests"] == []  # a replay fetches nothing
    assert (opened["status"]["text"], opened["controls"]["hidden"], opened["frame"]["max"]) == (
        "replay",
        False,
        "3",
    )
    assert opened["clock"]["text"] == "00:00 (frame 1 of 4)"
    for state, frame in zip(states, [*frames, frames[0]], strict=True):
        check_grid(state["nodes"]["html"], frame)
    # The same nodes: only the one that changed is redrawn (node-a, then node-<b>).
    assert (second["nodes"]["replaced"], third["nodes"]["replaced"]) == ([0], [0, 1])
    assert last["nodes"]["replaced"] == back["nodes"]["replaced"] == [0, 1]  # redrawn whole
    assert back["nodes"]["html"] == opened["nodes"]["html"]
    assert last["clock"]["text"] == "day 2 00:10 (frame 4 of 4)"
    assert last["totals"]["online"] == "1" and last["totals"]["free"] == "0"
    (pending,) = Tree(last["pending"]["html"]).having("li", "pending")
    assert pending[1] == "job-7: no-plan, waiting 1 h 6 min"
    # A frame carries the preemptions since the one before; the list keeps the recent ones.
    assert 'data-preemptor="web/chat-1"' in last["preemptions"]["html"]

"""The simulator's web view (`tidal simulate --dashboard`): frames recorded during a replay of a
small synthetic day, their documented shape, and the self-contained page written from them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.test_webview import decoded
from tidal.cli import app
from tidal.simulator.replay import PENDING_LISTED, RecordingReplay, recorded_policy
from tidal.simulator.run import prepare, replay_policy
from tidal.simulator.scenario import Scenario
from tidal.webview.snapshot import STATES

POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time\n"
)
GPU_KEYS = {"gpu", "state", "class", "tier", "namespace", "pod", "workload", "mode"}
FRAME_KEYS = {"version", "source", "time", "nodes", "reservations", "preemptions", "pending"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """openb-style pods (1 to 8 GPUs) and a daily load that peaks from 8:00 to 20:00."""
    openb = tmp_path / "openb-2023"
    openb.mkdir()
    sizes = [(1, 1800), (2, 3600), (4, 7200), (8, 5400), (2, 9000)]
    rows = [f"p{i},8000,32768,{g},1000,,BE,Running,0,{d},0" for i, (g, d) in enumerate(sizes)]
    (openb / "openb_pod_list_default.csv").write_text(POD_HEADER + "\n".join(rows) + "\n")
    qps = tmp_path / "genai-qps-2026"
    qps.mkdir()
    lines = [f"{h * 3600 + 60}.0,{1 + 10 * (8 <= h <= 20)},," for h in range(24)]
    (qps / "qps.csv").write_text(
        "timestamp_anon,value,container_ip,request_type\n" + "\n".join(lines)
    )
    return tmp_path


def tiny(data_dir: Path, **changes: Any) -> Scenario:
    """Four DGX-1s for 10 hours (the load rises at 8:00: online replicas preempt batch)."""
    base = Scenario(
        name="tiny",
        hours=10,
        step_s=600,
        cluster="synthetic",
        synthetic_nodes={"dgx1-v100": 4},
        online_peak=0.6,
        data_dir=data_dir,
        policies=("b0-default", "tidal"),
    )
    return dataclasses.replace(base, **changes)


def test_frames_record_the_day_without_changing_it(data_dir: Path) -> None:
    scenario = tiny(data_dir)
    inputs = prepare(scenario)
    replay = RecordingReplay(scenario, inputs, "tidal", every_s=1800)
    metrics = replay.run()
    frames = replay.frames
    assert [f["time"] for f in frames] == [1800.0 * i for i in range(21)]  # 0 to 10 h
    gpus = inputs.workload.total_gpus
    for frame in frames:
        assert set(frame) == {*FRAME_KEYS, "totals"}
        assert (frame["version"], frame["source"]) == (1, "simulator")
        assert [n["name"] for n in frame["nodes"]] == [f"dgx1-v100-{i:04d}" for i in range(4)]
        assert sum(frame["totals"].values()) == gpus
        for node in frame["nodes"]:
            assert [gpu["gpu"] for gpu in node["gpus"]] == list(range(8))
            for gpu in node["gpus"]:
                assert set(gpu) == GPU_KEYS and gpu["state"] in STATES
                assert gpu["pod"] == gpu["namespace"] == ""  # frames carry no pod names
                assert (gpu["class"] == "") == (gpu["state"] == "free")
                if gpu["state"] == "batch":
                    assert (gpu["class"], gpu["tier"]) == ("batch", "")
        assert len(frame["pending"]) <= PENDING_LISTED
        waits = [p["waiting_s"] for p in frame["pending"]]
        assert waits == sorted(waits, reverse=True)
    # The online peak is reached: replicas hold GPUs, and their tier is the one they asked for.
    online = [g for f in frames for n in f["nodes"] for g in n["gpus"] if g["state"] == "online"]
    assert online and {g["tier"] for g in online} <= {"numa", "nvlink", "pcie-switch", ""}
    # Each preemption is in exactly one frame, with what the metrics count of it.
    preemptions = [p for f in frames for p in f["preemptions"]]
    assert metrics.preemptions > 0
    assert len(preemptions) == metrics.preemptions
    assert sum(p["victim_gpus"] for p in preemptions) == metrics.victim_gpus
    assert sum(p["wasted_gpus"] for p in preemptions) == metrics.wasted_gpus
    assert sum(p["lost_gpu_seconds"] for p in preemptions) == pytest.approx(
        metrics.lost_gpu_seconds
    )
    assert all(p["victims"] and p["class"] == "online" for p in preemptions)
    for before, frame in itertools.pairwise(frames):
        assert all(before["time"] < p["time"] <= frame["time"] for p in frame["preemptions"])
    # Recording leaves the day as the policy's own replay has it.
    plain = replay_policy(scenario, "tidal", inputs=inputs)["summary"]
    timing = {k for k in plain if k.startswith("M11")}
    recorded = metrics.summary()
    assert {k: v for k, v in recorded.items() if k not in timing} == {
        k: v for k, v in plain.items() if k not in timing
    }


def test_the_tidal_policy_is_recorded_when_replayed_else_the_first(data_dir: Path) -> None:
    assert recorded_policy(tiny(data_dir)) == "tidal"
    assert recorded_policy(tiny(data_dir, policies=("b1-anchor", "b0-default"))) == "b1-anchor"


def test_cli_writes_a_replay_page(data_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: tiny\ncluster: synthetic\nsynthetic_nodes: {dgx1-v100: 4}\nhours: 3\n"
        f"step_s: 600\ndata_dir: {data_dir}\n"
    )
    page = tmp_path / "view" / "replay.html"
    args = ["simulate", "--scenario", str(spec), "--policy", "b0-default", "--no-plots"]
    args += ["--out", str(tmp_path / "out"), "--workers", "1"]
    args += ["--dashboard", str(page), "--dashboard-every", "30"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"web view: {page.resolve()} (7 frames of b0-default)" in result.output
    assert f"file://{page.resolve()}" in result.output
    html = page.read_text()
    embedded = re.search(r'<script type="application/json" id="replay">(.*?)</script>', html, re.S)
    assert embedded is not None
    document = json.loads(embedded[1])
    frames = decoded(document)
    assert [f["time"] for f in frames] == [1800.0 * i for i in range(7)]
    for frame in frames:
        assert set(frame) == {*FRAME_KEYS, "totals"}
        assert all(set(gpu) == GPU_KEYS for node in frame["nodes"] for gpu in node["gpus"])
    assert "http://" not in html and "https://" not in html  # nothing to fetch: it works offline


def test_no_page_without_the_flag(data_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        f"cluster: synthetic\nsynthetic_nodes: {{dgx1-v100: 2}}\nhours: 1\ndata_dir: {data_dir}\n"
    )
    args = [
        "simulate",
        "--scenario",
        str(spec),
        "--policy",
        "tidal",
        "--no-plots",
        "--workers",
        "1",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "web view" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*.html")) == []


def test_a_dashboard_path_that_cannot_be_written_is_refused_before_the_replay(
    tmp_path: Path,
) -> None:
    args = ["simulate", "--quick", "--no-plots", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--dashboard", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "--dashboard" in result.output and "is a folder" in result.output
    assert not (tmp_path / "out").exists()  # nothing replayed

"""Simulator: loaders on small generated fixtures (and the real files when present), engine
invariants and determinism on a synthetic cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tidal.simulator import Scenario, ScenarioError, simulate
from tidal.simulator.data import DEFAULT_DATA_DIR, DataError, hourly_load_shape, openb_batch_pods
from tidal.simulator.scenario import scenario_from_mapping

POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time\n"
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    openb = tmp_path / "openb-2023"
    openb.mkdir()
    rows = [
        f"p{i},8000,32768,{g},1000,,{qos},Running,0,{d},0"
        for i, (g, qos, d) in enumerate(
            [
                (1, "BE", 1800),
                (2, "BE", 3600),
                (4, "Burstable", 7200),
                (1, "LS", 100),
                (8, "BE", 5400),
            ]
        )
    ]
    (openb / "openb_pod_list_default.csv").write_text(POD_HEADER + "\n".join(rows) + "\n")
    (openb / "openb_node_list_gpu_node.csv").write_text(
        "sn,cpu_milli,memory_mib,gpu,model\nn0,96000,786432,8,V100M32\nn1,64000,262144,2,T4\n"
    )
    qps = tmp_path / "genai-qps-2026"
    qps.mkdir()
    lines = [f"{h * 3600 + 60}.0,{1 + 10 * (8 <= h <= 20)},," for h in range(24)]
    (qps / "qps.csv").write_text(
        "timestamp_anon,value,container_ip,request_type\n" + "\n".join(lines)
    )
    return tmp_path


def small(data_dir: Path, **changes: object) -> Scenario:
    base = Scenario(
        name="test",
        hours=12,  # the fixture's load peaks from 8:00 to 20:00
        step_s=600,
        batch_load=1.0,
        cluster="synthetic",
        synthetic_nodes={"dgx1-v100": 6, "pcie-8x-l40s": 4},
        online_peak=0.6,
        data_dir=data_dir,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_loaders_keep_whole_gpu_batch_pods_and_scale_the_daily_shape(data_dir: Path) -> None:
    pods = openb_batch_pods(data_dir / "openb-2023" / "openb_pod_list_default.csv")
    assert [p.gpus for p in pods] == [1, 2, 4, 8]  # the LS pod is online work, not batch
    shape = hourly_load_shape(data_dir / "genai-qps-2026" / "qps.csv")
    assert max(shape) == 1.0 and shape[3] == pytest.approx(1 / 11)


def test_malformed_trace_names_file_row_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "pods.csv"
    bad.write_text(POD_HEADER + "p0,8000,32768,one,1000,,BE,Running,0,10,0\n")
    with pytest.raises(DataError, match=r"pods.csv: row 2, column 'num_gpu': not a number: 'one'"):
        openb_batch_pods(bad)


def test_every_policy_replays_without_breaking_invariants(data_dir: Path) -> None:
    result = simulate(small(data_dir))
    summaries = {p["summary"]["policy"]: p["summary"] for p in result["policies"]}
    assert set(summaries) == {"tidal", "b0-default", "b1-anchor", "b2-subsets"}
    for summary in summaries.values():
        assert summary["M10_priority_inversions"] == 0
        assert summary["M10_double_allocations"] == 0
        assert summary["M10_leaked_reservations"] == 0
    # The online peak forces preemptions, and guaranteed placements made by ours are aligned.
    assert summaries["tidal"]["preemptions"] > 0
    assert summaries["tidal"]["M1_affinity_hit_guaranteed"] in (None, 1.0)


def test_same_seed_same_result(data_dir: Path) -> None:
    scenario = small(data_dir, policies=("tidal",), hours=3)
    first = simulate(scenario)["policies"][0]["summary"]
    again = simulate(scenario)["policies"][0]["summary"]
    timing = {k for k in first if k.startswith("M11")}
    assert {k: v for k, v in first.items() if k not in timing} == {
        k: v for k, v in again.items() if k not in timing
    }


def test_bad_scenario_field_is_named() -> None:
    with pytest.raises(ScenarioError, match=r"field 'online_peak': must be within 0\.\.1"):
        scenario_from_mapping({"online_peak": 3})
    with pytest.raises(ScenarioError, match="unknown field"):
        scenario_from_mapping({"hourz": 3})


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="../shared/data is absent")
def test_real_openb_pods_load() -> None:
    pods = openb_batch_pods(DEFAULT_DATA_DIR / "openb-2023" / "openb_pod_list_default.csv")
    assert len(pods) > 500 and all(p.gpus >= 1 for p in pods)

"""Bring your own cluster: node lists, job lists and load shapes in every supported format
(small files written here), what the loaders keep and drop and why, every error path, and
replays that honour GPU-model constraints, gangs and online/batch classes."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import fsspec
import pytest
import typer
from typer.testing import CliRunner

from tidal.api import LABEL_GPU_MODEL
from tidal.placement import NodeInfo, make_policy
from tidal.simulator.cli import simulate_command
from tidal.simulator.cluster_model import PresetTable
from tidal.simulator.data import DEFAULT_DATA_DIR, DataError
from tidal.simulator.engine import Replay
from tidal.simulator.run import prepare
from tidal.simulator.scenario import (
    Scenario,
    ScenarioError,
    TraceSource,
    load_scenario,
    scenario_from_mapping,
)
from tidal.simulator.traces import (
    SourceReport,
    TraceJob,
    TraceNode,
    read_jobs,
    read_load,
    read_nodes,
)
from tidal.simulator.workload import BatchJob, OnlineJob, TraceWorkload
from tidal.topology import preset_shape

NO_PRESETS = PresetTable.parse({})


def write(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join((header, *rows)) + "\n")
    return path


def nodes_of(
    path: Path, presets: dict[str, str] | None = None, **source: Any
) -> tuple[list[TraceNode], SourceReport]:
    return read_nodes(TraceSource(str(path), **source), PresetTable.parse(presets or {}))


def jobs_of(
    path: Path, need_submit: bool = False, **source: Any
) -> tuple[list[TraceJob], SourceReport]:
    return read_jobs(TraceSource(str(path), **source), need_submit)


OPENB_PODS = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
    "deletion_time,scheduled_time"
)
SPOT_NODES = "node_name,gpu_model,gpu_capacity_num,cpu_num"
SPOT_JOBS = (
    "job_name,organization,gpu_model,cpu_request,gpu_request,worker_num,submit_time,duration,"
    "job_type"
)
HELIOS = (
    "job_id,user,vc,gpu_num,cpu_num,node_num,state,submit_time,start_time,end_time,duration,queue"
)


# -- formats ----------------------------------------------------------------------------------


def test_openb_pod_list_keeps_whole_gpu_pods_by_class_and_counts_the_rest(tmp_path: Path) -> None:
    pods = write(
        tmp_path / "openb_pod_list_gpuspec.csv",
        OPENB_PODS,
        "p0,8000,32768,1,1000,,BE,Running,100,1900,100",  # batch, 1 GPU, 30 min
        "p1,4000,16384,1,460,,BE,Running,0,600,0",  # a share of one GPU
        "p2,2000,4096,0,0,,LS,Running,0,600,0",  # CPU-only
        "p3,88000,327680,8,1000,V100M16|V100M32,Burstable,Succeeded,0,3600,0",  # constrained
        "p4,16000,32768,1,1000,,LS,Running,0,99999,0",  # online
        "p5,16000,32768,1,1000,,Guaranteed,Running,0,99999,0",  # online
        "p6,8000,32768,2,1000,,BE,Failed,500,500,500",  # ran for no time
    )
    jobs, report = jobs_of(pods)
    assert [(j.name, j.job_class, j.gpus) for j in jobs] == [
        ("p0", "batch", 1),
        ("p3", "batch", 8),
        ("p4", "online", 1),
        ("p5", "online", 1),
    ]
    assert jobs[0].duration_s == 1800 and jobs[0].submit_s == 100
    assert jobs[1].gpu_models == {"v100m16", "v100m32"}  # gpu_spec, compared without case
    assert report.format == "openb" and (report.rows, report.kept) == (7, 4)
    assert dict(report.drops) == {
        "a share of one GPU (tidal schedules whole GPUs)": 1,
        "no GPUs (CPU-only)": 1,
        "duration <= 0": 1,
    }


def test_openb_lists_without_qos_or_times_need_durations_and_are_all_batch(
    tmp_path: Path,
) -> None:
    """The multigpu lists carry only name,cpu_milli,memory_mib,num_gpu,gpu_milli: QoS is
    assumed (batch, said in a note), durations are required."""
    pods = write(
        tmp_path / "openb_pod_list_multigpu50.csv",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli",
        "p0,12000,16384,1,1000",
        "p1,32000,65536,4,1000",
    )
    with pytest.raises(DataError, match=r"no job durations.*defaults: \{duration_s: 3600\}"):
        jobs_of(pods)
    jobs, report = jobs_of(pods, defaults={"duration_s": 5400})
    assert [(j.job_class, j.gpus, j.duration_s) for j in jobs] == [
        ("batch", 1, 5400),
        ("batch", 4, 5400),
    ]
    assert any("no column 'qos': class = 'batch' for every row" in n for n in report.notes)
    assert any("every job runs 5400 s" in n for n in report.notes)


def test_spot_trace_nodes_convert_cores_default_memory_and_map_models(tmp_path: Path) -> None:
    nodes = write(
        tmp_path / "node_info_df.csv",
        SPOT_NODES,
        "0,GPU-series-1,4,192",
        "1,A10,1,128",
        "2,A100-SXM4-80GB,8,128",
        "3,H800,8,192",
    )
    loaded, report = nodes_of(nodes, {"H800": "dgx-h100"})
    assert report.format == "alibaba-spot"
    by_name = {n.name: n for n in loaded}
    assert by_name["0"].cpu_milli == 192_000  # cpu_num is in cores
    assert by_name["0"].memory_mib == 1_000_000  # no memory column: the documented default
    assert [(n.preset, n.preset_from) for n in loaded] == [
        ("a100-pcie-nvlink-pairs", "built-in, by GPU count"),
        ("single-gpu", "built-in, by GPU count"),
        ("hgx-a100", "built-in model table"),
        ("dgx-h100", "scenario presets"),
    ]
    assert "no column for memory_mib: memory_mib = 1000000.0 for every row" in report.notes[0]


def test_spot_trace_jobs_are_gangs_with_classes_and_gpu_models(tmp_path: Path) -> None:
    jobs = write(
        tmp_path / "job_info_df.csv",
        SPOT_JOBS,
        "239255,13,A10,20,1,1,0,2764799,HP",
        "437260,57,A100-SXM4-80GB,15,1,16,9589663,41060,Spot",
        "437261,57,A100-SXM4-80GB,15,0.5,1,9589663,41060,Spot",
    )
    loaded, report = jobs_of(jobs, need_submit=True)
    online, gang = loaded
    assert (online.job_class, online.gpus, online.workers, online.cpu_milli) == (
        "online",
        1,
        1,
        20_000,
    )
    assert online.gpu_models == {"a10"}
    assert (gang.job_class, gang.gpus, gang.workers, gang.total_gpus) == ("batch", 1, 16, 16)
    assert (gang.submit_s, gang.duration_s) == (9589663, 41060)
    assert report.drops == {"a share of one GPU (tidal schedules whole GPUs)": 1}


def test_helios_counts_resources_per_job_over_its_nodes(tmp_path: Path) -> None:
    log = write(
        tmp_path / "cluster_log.csv",
        HELIOS,
        "1,uA,vcA,16,64,2,COMPLETED,2020-06-09 18:41:01,2020-06-09 18:41:01,"
        "2020-06-10 04:55:09,36848,0",
        "2,uB,vcB,3,4,2,FAILED,2020-06-09 18:41:27,2020-06-09 18:41:27,2020-06-09 18:45:36,249,0",
        "3,uC,vcC,0,8,1,COMPLETED,2020-06-09 18:42:00,2020-06-09 18:42:00,2020-06-09 19:00:00,"
        "1080,0",
    )
    loaded, report = jobs_of(log, need_submit=True)
    (job,) = loaded
    assert report.format == "helios"
    assert (job.gpus, job.workers, job.cpu_milli, job.job_class) == (8, 2, 32_000, "batch")
    assert job.submit_s == pytest.approx(1591728061)  # 2020-06-09 18:41:01 UTC
    assert report.drops == {
        "GPUs do not split evenly over the workers": 1,
        "no GPUs (CPU-only)": 1,
    }


def test_any_csv_through_column_mapping_units_and_classes(tmp_path: Path) -> None:
    """A cluster's own export: its column names, cores, GiB, hours and priority names."""
    nodes = write(
        tmp_path / "inventory.csv",
        "host,accelerator,count,vcpus,ram_gib",
        "gpu-a,H100-SXM,8,224,2048",
    )
    loaded, _ = nodes_of(
        nodes,
        columns={
            "name": "host",
            "gpu_model": "accelerator",
            "gpus": "count",
            "cpu_milli": "vcpus",
            "memory_mib": "ram_gib",
        },
        units={"cpu_milli": "cores", "memory_mib": "gib"},
    )
    assert (loaded[0].cpu_milli, loaded[0].memory_mib, loaded[0].preset) == (
        224_000,
        2_097_152,
        "dgx-h100",
    )
    jobs = write(
        tmp_path / "export.csv",
        "id,prio,gpus,hours,submitted",
        "a,prod,4,2,2024-05-01T08:00:00",
        "b,preemptible,8,0.5,2024-05-01T09:30:00",
        "c,test,1,1,2024-05-01T10:00:00",
    )
    loaded_jobs, report = jobs_of(
        jobs,
        columns={"name": "id", "class": "prio", "duration_s": "hours", "submit_s": "submitted"},
        units={"duration_s": "h"},
        classes={"prod": "online", "preemptible": "batch", "test": "drop"},
    )
    assert [(j.name, j.job_class, j.duration_s) for j in loaded_jobs] == [
        ("a", "online", 7200),
        ("b", "batch", 1800),
    ]
    assert report.format == "tidal" and report.drops == {"class mapped to drop": 1}


def test_tidal_schema_nodes_name_their_preset_and_load_has_hours(tmp_path: Path) -> None:
    nodes = write(tmp_path / "nodes.csv", "name,gpus,preset", "n0,8,rtx4090-8x", "n1,4,gb200-nvl72")
    loaded, report = nodes_of(nodes)
    assert [(n.preset, n.preset_from) for n in loaded] == [
        ("rtx4090-8x", "the node list's preset column"),
        ("gb200-nvl72", "the node list's preset column"),
    ]
    assert report.format == "tidal"
    load = write(
        tmp_path / "load.csv", "hour,rps", *(f"{h},{10 if 9 <= h < 18 else 1}" for h in range(24))
    )
    shape, _ = read_load(
        TraceSource(str(load), columns={"time_s": "hour", "value": "rps"}, units={"time_s": "h"})
    )
    assert shape[12] == 1.0 and shape[3] == pytest.approx(0.1)


def test_files_by_uri_and_compressed(tmp_path: Path) -> None:
    rows = ("sn,cpu_milli,memory_mib,gpu,model", "n0,96000,786432,8,V100M32")
    plain = write(tmp_path / "nodes.csv", *rows)
    packed = tmp_path / "nodes.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with fsspec.open("memory://traces/nodes.csv", "w") as remote:
        remote.write("\n".join(rows) + "\n")
    for location in (plain.as_uri(), str(packed), "memory://traces/nodes.csv"):
        loaded, _ = read_nodes(TraceSource(location), NO_PRESETS)
        assert [(n.name, n.preset) for n in loaded] == [("n0", "dgx1-v100")], location


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "row", "source", "message"),
    [
        (
            SPOT_NODES,
            "7,H800,8,192",
            {},
            r"node_info_df.csv: row 2, column 'gpu_model': no topology preset for 8 x 'H800': "
            r"add `presets: \{H800: dgx-h100\}` to the scenario",
        ),
        (
            SPOT_NODES,
            "7,GPU-series-9,6,192",
            {},
            r"row 2, column 'gpu_model': no topology preset has 6 GPUs .*on_unmapped: drop",
        ),
        (
            SPOT_NODES,
            "7,A10,eight,192",
            {},
            r"row 2, column 'gpu_capacity_num': not a number: 'eight'",
        ),
        (
            SPOT_NODES,
            "7,A10,2.5,192",
            {},
            r"row 2, column 'gpu_capacity_num': not a whole number: '2.5'",
        ),
        (SPOT_NODES, "7,A10,1,-4", {}, r"column 'cpu_num': must be a finite number >= 0: '-4'"),
        (
            "node_name,gpu_model,cpu_num",
            "7,A10,4",
            {"format": "alibaba-spot"},
            r"missing column 'gpu_capacity_num' \(field gpus, format alibaba-spot\); the header "
            r"has: node_name, gpu_model, cpu_num\. Map the field to a column with "
            r"`nodes: \{columns: \{gpus: <column>\}\}`",
        ),
        (
            "host,gpus_per_node",
            "7,8",
            {},
            r"cannot tell the nodes format from the header \(host, gpus_per_node\): set "
            r"`nodes: \{format: <name>\}` \(one of openb, alibaba-spot, tidal\)",
        ),
        ("name,gpus,preset", "n0,8,dgx-z", {}, r"column 'preset': unknown preset \(known: "),
        (
            "name,gpus,preset",
            "n0,4,dgx-h100",
            {},
            r"column 'preset': preset has 8 GPUs but the node has 4: 'dgx-h100'",
        ),
        ("name,gpus", ",8", {}, r"row 2, column 'name': empty, and the field name needs a value"),
        (
            "name,gpus",
            "n0,8",
            {},
            r"row 2, column 'gpu_model': a node of 8 GPUs with no GPU model: name its preset in a "
            r"`preset` column",
        ),
    ],
)
def test_node_list_errors_name_file_row_column_value_and_fix(
    tmp_path: Path, header: str, row: str, source: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "node_info_df.csv", header, row)
    with pytest.raises(DataError, match=message):
        nodes_of(path, **source)


def test_a_preset_for_another_gpu_count_says_which_key_to_add(tmp_path: Path) -> None:
    path = write(tmp_path / "nodes.csv", SPOT_NODES, "0,H800,8,192", "1,H800,4,192")
    with pytest.raises(
        DataError,
        match=r"row 3, column 'gpu_model': presets maps 'H800' to dgx-h100 \(8 GPUs\) but this "
        r'node has 4: add `presets: \{"H800/4": a100-pcie-nvlink-pairs\}`',
    ):
        nodes_of(path, {"H800": "dgx-h100"})
    loaded, _ = nodes_of(path, {"H800": "dgx-h100", "H800/4": "a100-pcie-nvlink-pairs"})
    assert [n.preset for n in loaded] == ["dgx-h100", "a100-pcie-nvlink-pairs"]


def test_unmapped_and_cpu_only_nodes_may_be_dropped_and_are_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "nodes.csv", SPOT_NODES, "0,X9,6,32", "1,X9,6,32", "2,,0,64", "3,A10,1,64"
    )
    loaded, report = nodes_of(path, on_unmapped="drop")
    assert [n.name for n in loaded] == ["3"]
    assert report.drops == {"no topology preset for 6 x 'X9'": 2, "no GPUs (CPU-only node)": 1}


def test_duplicate_nodes_and_empty_clusters_are_errors(tmp_path: Path) -> None:
    twice = write(tmp_path / "nodes.csv", "name,gpus", "a,1", "b,2", "a,4")
    with pytest.raises(
        DataError, match=r"row 4, column 'name': duplicate node name \(first on row 2\)"
    ):
        nodes_of(twice)
    cpu_only = write(tmp_path / "cpu.csv", "name,gpus", "a,0")
    with pytest.raises(DataError, match=r"cpu.csv: no GPU nodes \(1 rows; dropped: no GPUs"):
        nodes_of(cpu_only)


@pytest.mark.parametrize(
    ("rows", "source", "message"),
    [
        (
            ("j1,1,A10,8,1,1,0,60,Preemptible",),
            {},
            r"row 2, column 'job_type': class not mapped \(mapped: hp, spot\); add "
            r"`jobs: \{classes: \{Preemptible: batch\}\}`",
        ),
        (
            ("j1,1,A10,8,1,1,yesterday,60,HP",),
            {"arrivals": "trace"},
            r"row 2, column 'submit_time': not a time \(seconds, or YYYY-MM-DD HH:MM:SS\): "
            r"'yesterday'",
        ),
        (
            ("j1,1,A10,8,1,1,0,,HP",),
            {},
            r"row 2: no duration \('duration' is empty",
        ),
        (("j1,1,A10,8,1",), {}, r"row 2: 5 cells, but column 'job_type' is number 9"),
    ],
)
def test_job_list_errors_name_file_row_column_value_and_fix(
    tmp_path: Path, rows: tuple[str, ...], source: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "job_info_df.csv", SPOT_JOBS, *rows)
    with pytest.raises(DataError, match=message):
        jobs_of(path, need_submit=source.get("arrivals") == "trace")


def test_trace_arrivals_need_submission_times(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.csv", "gpus,duration_s", "1,60")
    with pytest.raises(DataError, match=r"`arrivals: trace` replays submission times.*submit_s"):
        jobs_of(path, need_submit=True)
    gap = write(tmp_path / "gap.csv", "gpus,duration_s,submit_s", "1,60,0", "2,60,")
    with pytest.raises(DataError, match=r"row 3, column 'submit_s': empty, and `arrivals: trace`"):
        jobs_of(gap, need_submit=True)


def test_a_file_that_is_not_csv_text_is_named(tmp_path: Path) -> None:
    binary = tmp_path / "nodes.csv"
    binary.write_bytes(gzip.compress(b"name,gpus\nn0,8\n"))  # compressed, but not named .gz
    with pytest.raises(DataError, match=r"nodes.csv: line \d+: not a CSV text file"):
        nodes_of(binary)


def test_a_scenario_with_no_batch_work_left_says_what_was_dropped(tmp_path: Path) -> None:
    write(tmp_path / "nodes.csv", "name,gpus", "n0,4")
    write(tmp_path / "jobs.csv", "gpus,duration_s,class", "1,60,online", "0,60,batch")
    write(tmp_path / "load.csv", "time_s,value", "0,1")
    spec = {"nodes": "nodes.csv", "jobs": "jobs.csv", "load": "load.csv"}
    scenario = scenario_from_mapping(spec, base=tmp_path)
    with pytest.raises(
        DataError,
        match=r"jobs.csv: no batch jobs to replay \(2 rows read, dropped: no GPUs \(CPU-only\): "
        r"1; online class: not replayed",
    ):
        prepare(scenario)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.csv: cannot read trace file: No such file"):
        nodes_of(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"presets": {"H800": "dgx-h800"}}, r"field 'presets': 'H800': unknown preset 'dgx-h800'"),
        (
            {"presets": {"H800/4": "dgx-h100"}},
            r"field 'presets': 'H800/4': preset dgx-h100 has 8 GPUs, not 4",
        ),
        (
            {"nodes": {"path": "n.csv", "columns": {"ram": "mem"}}},
            r"field 'nodes': unknown field 'ram'",
        ),
        (
            {"nodes": {"path": "n.csv", "units": {"cpu_milli": "kores"}}},
            r"field 'nodes': unknown unit 'kores' for 'cpu_milli'; one of milli, cores",
        ),
        (
            {"jobs": {"path": "j.csv", "classes": {"HP": "urgent"}}},
            r"field 'jobs': classes\['HP'\]: 'urgent' is not one of online, batch, drop",
        ),
        ({"jobs": {"path": "j.csv", "format": "philly"}}, r"unknown jobs format 'philly'; one of"),
        (
            {"nodes": {"path": "n.csv", "classes": {}}},
            r"field 'nodes': unknown key\(s\) \['classes'\]",
        ),
        ({"jobs": {"format": "openb"}}, r"field 'jobs': missing 'path'"),
        ({"online": "trace"}, r"field 'online': 'trace' replays the trace's own times"),
        (
            {"nodes": "n.csv", "cluster": "synthetic"},
            r"field 'nodes': a trace cluster needs a node list, and only a trace cluster reads one",
        ),
        ({"jobs": {"path": "j.csv", "defaults": {"gpus": "two"}}}, r"defaults.gpus: not a number"),
    ],
)
def test_scenario_trace_fields_are_checked_when_loaded(
    spec: dict[str, object], message: str
) -> None:
    with pytest.raises(ScenarioError, match=message):
        scenario_from_mapping(spec)


def test_relative_trace_paths_are_taken_from_the_scenario_folder(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    spec = tmp_path / "my.yaml"
    spec.write_text("nodes: traces/nodes.csv\njobs: {path: traces/jobs.csv, format: tidal}\n")
    scenario = load_scenario(spec)
    assert scenario.cluster == "trace"
    assert scenario.nodes == TraceSource(str(tmp_path / "traces" / "nodes.csv"))
    assert scenario.jobs is not None and scenario.jobs.path == str(tmp_path / "traces/jobs.csv")


# -- the replay -------------------------------------------------------------------------------


def spot_cluster(tmp_path: Path) -> Path:
    """A small cluster in the spot trace's format and a day of its jobs (written here)."""
    write(
        tmp_path / "node_info_df.csv",
        SPOT_NODES,
        *(f"a{i},A100-SXM4-80GB,8,128" for i in range(4)),
        *(f"h{i},H800,8,192" for i in range(2)),
        *(f"t{i},A10,1,64" for i in range(4)),
    )
    jobs = []
    for i in range(120):
        model = ("A100-SXM4-80GB", "H800", "A10")[i % 3]
        gpus, workers = ((8, 2), (4, 1), (1, 1), (2, 3))[i % 4] if model != "A10" else (1, 1)
        kind = "HP" if i % 7 == 0 else "Spot"
        jobs.append(f"{i},1,{model},8,{gpus},{workers},{600 * i},{3600 + 97 * i},{kind}")
    jobs.append("900,1,V100,8,1,1,60,600,Spot")  # a model the cluster lacks
    jobs.append("901,1,A10,8,2,1,60,600,Spot")  # more GPUs than an A10 node has
    jobs.append(f"902,1,A10,8,1,1,{86400 * 3},600,Spot")  # after the replayed window
    write(tmp_path / "job_info_df.csv", SPOT_JOBS, *jobs)
    spec = tmp_path / "spot.yaml"
    spec.write_text(
        "name: spot\nnodes: node_info_df.csv\n"
        "jobs: {path: job_info_df.csv, arrivals: trace}\nonline: trace\nhours: 24\n"
        "presets: {H800: dgx-h100}\n"
    )
    return spec


def test_what_was_loaded_and_dropped_is_reported(tmp_path: Path) -> None:
    inputs = prepare(load_scenario(spot_cluster(tmp_path)))
    report = inputs.report.as_dict()
    jobs = next(s for s in report["sources"] if s["kind"] == "jobs")
    assert jobs["rows"] == 123 and jobs["kept"] == 120
    assert jobs["dropped"] == {
        "asks for GPU models no node has: v100": 1,
        "more GPUs per worker than any node has": 1,
        "submitted after the replayed window (hours)": 1,
    }
    assert {(g["gpu_model"], g["preset"], g["nodes"]) for g in report["nodes"]} == {
        ("A100-SXM4-80GB", "hgx-a100", 4),
        ("H800", "dgx-h100", 2),
        ("A10", "single-gpu", 4),
    }
    online = [g for g in report["jobs"] if g["job_class"] == "online"]
    assert sum(g["jobs"] for g in online) == 18 and len(inputs.workload.online_jobs) == 18
    gangs = {g["gpus"]: g for g in report["jobs"] if g["job_class"] == "batch"}
    assert gangs[8]["max_workers"] == 2 and gangs[2]["max_workers"] == 3
    assert any(job.workers == 3 for job in inputs.workload.jobs)


def test_the_services_mode_counts_online_rows_it_does_not_replay(tmp_path: Path) -> None:
    spec = spot_cluster(tmp_path)
    spec.write_text(
        "nodes: node_info_df.csv\njobs: job_info_df.csv\npresets: {H800: dgx-h100}\n"
        "load: {path: load.csv, format: tidal}\n"
    )
    write(tmp_path / "load.csv", "time_s,value", *(f"{h * 3600},{1 + h % 12}" for h in range(24)))
    report = prepare(load_scenario(spec)).report.as_dict()
    jobs = next(s for s in report["sources"] if s["kind"] == "jobs")
    assert jobs["dropped"]["online class: not replayed (online demand follows `services`)"] == 18
    assert "submitted after the replayed window (hours)" not in jobs["dropped"]  # sampled


def trace_nodes() -> list[NodeInfo]:
    def node(name: str, preset: str, model: str) -> NodeInfo:
        return NodeInfo(
            name, preset_shape(preset), 128_000, 1_000_000, labels={LABEL_GPU_MODEL: model}
        )

    return [
        node("a0", "dgx-h100", "H800"),
        node("a1", "dgx-h100", "H800"),
        node("l0", "pcie-8x-l40s", "L40S"),
    ]


def replay_of(
    jobs: tuple[BatchJob, ...], online: tuple[OnlineJob, ...] = (), policy: str = "tidal"
) -> Replay:
    scenario = dataclasses.replace(
        Scenario(cluster="synthetic", hours=4, step_s=600), online="trace"
    )
    workload = TraceWorkload(jobs, (0.0,) * 24, 24, online)
    replay = Replay(scenario, trace_nodes(), workload, make_policy(policy))
    replay.run()
    return replay


def test_a_job_constrained_to_a_gpu_model_runs_only_on_that_model() -> None:
    """Eight 4-GPU jobs that may run only on L40S: two run (one L40S node), six wait, while
    the H800 nodes stay free; an unconstrained job runs on an H800 node."""
    long = 10 * 3600.0
    l40s = frozenset({"l40s"})
    jobs = tuple(BatchJob(f"l{i}", float(i), 4, 1000, 1000, long, 1, l40s) for i in range(8))
    replay = replay_of((*jobs, BatchJob("any", 20.0, 8, 1000, 1000, long)))
    nodes = {pod.uid: pod.node for pod in replay.snapshot.pods.values()}
    assert nodes == {"l0": "l0", "l1": "l0", "any": "a0"}
    assert replay.pending_batch.pending_by_gpus() == {4: 6}
    pool = replay.cluster.view(l40s)
    assert set(pool.nodes) == {"l0"} and set(pool.pods) == {"l0", "l1"}  # kept in step


def test_a_gang_starts_whole_or_not_at_all() -> None:
    """Three 8-GPU workers never fit two 8-GPU H800 nodes: none of them holds a GPU, and a
    two-worker gang behind it starts on both nodes."""
    long = 10 * 3600.0
    h800 = frozenset({"h800"})
    big = BatchJob("big", 0.0, 8, 1000, 1000, long, 3, h800)
    pair = BatchJob("pair", 1.0, 8, 1000, 1000, long, 2, h800)
    replay = replay_of((big, pair))
    pods = replay.snapshot.pods
    assert sorted(pods) == ["pair/0", "pair/1"]
    assert {pods[u].node for u in pods} == {"a0", "a1"} and pods["pair/0"].gang == "pair"
    assert replay.pending_batch.pending_by_gpus() == {8: 1}


@pytest.mark.parametrize(("policy", "victims", "broken"), [("tidal", 2, 0), ("b0-default", 1, 1)])
def test_preempting_one_worker_of_a_gang_evicts_the_whole_gang(
    policy: str, victims: int, broken: int
) -> None:
    """An online job needs one H800 node held by a two-worker batch gang. Ours plans the whole
    gang as victims; the count-based default picks one worker, and the replay evicts the other
    too (a gang cannot run short): a broken gang, counted."""
    h800 = frozenset({"h800"})
    gang = BatchJob("gang", 0.0, 8, 1000, 1000, 8 * 3600.0, 2, h800)
    online = OnlineJob("svc", 600.0, 8, 1, 1000, 1000, 3600.0, h800)
    replay = replay_of((gang,), (online,), policy)
    metrics = replay.metrics
    assert metrics.preemptions == 1 and metrics.victim_pods == victims
    assert metrics.broken_gangs == broken
    assert replay.jobs["gang"].preemptions == 1  # the whole job was evicted and requeued
    # The online job left after its hour; the gang ran again on both nodes.
    assert set(replay.snapshot.pods) == {"gang/0", "gang/1"}
    assert metrics.summary()["M10_double_allocations"] == 0


# -- the command line, end to end -------------------------------------------------------------


def simulate_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(simulate_command)
    return app


def philly_like_to_tidal(log: list[dict[str, Any]], path: Path) -> Path:
    """The conversion a user writes for a job log tidal does not read (a Philly-style JSON
    list here) into the tidal job CSV."""
    rows = [
        f"{j['jobid']},{'online' if j['vc'] == 'prod' else 'batch'},{j['gpus_per_node']},"
        f"{j['nodes']},{j['submitted']},{j['runtime_s']}"
        for j in log
    ]
    return write(path, "name,class,gpus,workers,submit_s,duration_s", *rows)


def test_a_converted_trace_replays_end_to_end(tmp_path: Path) -> None:
    log = [
        {
            "jobid": f"application_{i}",
            "vc": "prod" if i % 5 == 0 else "research",
            "gpus_per_node": (1, 2, 4, 8)[i % 4],
            "nodes": 2 if i % 6 == 1 else 1,
            "submitted": 120 * i,
            "runtime_s": 1800 + 60 * i,
        }
        for i in range(90)
    ]
    philly_like_to_tidal(log, tmp_path / "jobs.csv")
    write(tmp_path / "nodes.csv", "name,gpus,gpu_model", *(f"n{i},8,V100M32" for i in range(6)))
    spec = tmp_path / "converted.yaml"
    spec.write_text(
        "name: converted\nnodes: nodes.csv\njobs: {path: jobs.csv, arrivals: trace}\n"
        "online: trace\nhours: 4\nstep_s: 600\npolicies: [tidal, b0-default]\n"
    )
    runner = CliRunner()
    dry = runner.invoke(
        simulate_app(), ["--scenario", str(spec), "--dry-run"], env={"COLUMNS": "200"}
    )
    assert dry.exit_code == 0, dry.output
    assert "nodes per preset" in dry.output and "dgx1-v100" in dry.output
    assert "jobs per class and size" in dry.output and "rows dropped: none" in dry.output
    assert "online: 18 trace online jobs" in dry.output
    assert not (tmp_path / "out").exists()  # a dry run replays nothing
    out = tmp_path / "out"
    args = ["--scenario", str(spec), "--out", str(out), "--no-plots", "--workers", "1"]
    result = runner.invoke(simulate_app(), args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["nodes"] == 6 and saved["batch_jobs"] == 72
    assert saved["trace"]["sources"][1]["format"] == "tidal"
    summaries = {p["summary"]["policy"]: p["summary"] for p in saved["policies"]}
    for summary in summaries.values():
        assert summary["M10_double_allocations"] == 0 and summary["M10_priority_inversions"] == 0
        assert summary["M8_jobs_completed"] > 0
    assert summaries["tidal"]["M4_broken_gangs"] == 0


def test_the_command_line_names_a_bad_trace_and_exits(tmp_path: Path) -> None:
    write(tmp_path / "nodes.csv", SPOT_NODES, "0,H800,8,192")
    spec = tmp_path / "bad.yaml"
    spec.write_text("nodes: nodes.csv\njobs: {path: jobs.csv, format: tidal}\n")
    result = CliRunner().invoke(
        simulate_app(), ["--scenario", str(spec), "--dry-run"], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # undo the console's line wrapping
    assert "no topology preset for 8 x 'H800'" in output
    assert "add `presets: {H800: dgx-h100}` to the scenario" in output


# -- the bundled openb lists (when the data folder is present) --------------------------------


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="the bundled traces are absent")
def test_every_bundled_openb_pod_list_loads_as_its_own_workload() -> None:
    """The gpushare list replays its own pods (not the default's), the multigpu list needs the
    duration it lacks, and the default list's dropped rows are all accounted for."""
    folder = DEFAULT_DATA_DIR / "openb-2023"
    default, report = jobs_of(folder / "openb_pod_list_default.csv")
    assert sum(j.job_class == "batch" for j in default) == 728
    assert report.rows == 8152 == report.kept + sum(report.drops.values())
    share, _ = jobs_of(folder / "openb_pod_list_gpushare40.csv")
    assert sum(j.job_class == "batch" for j in share) == 565
    multi, _ = jobs_of(folder / "openb_pod_list_multigpu50.csv", defaults={"duration_s": 3600})
    assert sum(j.gpus == 8 for j in multi) == 556

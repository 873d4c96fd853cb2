"""Loaders for node lists, job lists and online load shapes in any supported format
(:mod:`tidal.simulator.formats`), with every dropped row counted by reason.

A row the simulator cannot use for a stated reason (a CPU-only pod, a GPU share, online work
when online demand comes from the scenario's services) is dropped and counted; a row it cannot
read (a bad number, an unmapped GPU model, an unknown class) stops the load with a
:class:`DataError` naming the file, row, column and value, and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tidal.simulator.cluster_model import FROM_FILE, PresetTable, model_key, preset_gpus, resolve
from tidal.simulator.data import DataError
from tidal.simulator.formats import (
    FIELDS,
    FORMATS,
    Kind,
    TraceFormat,
    find_format,
    format_names,
    guess_format,
)
from tidal.simulator.scenario import TraceSource
from tidal.simulator.sources import Layout, Table, open_trace, rows
from tidal.topology import preset_names

# Drop reasons (the summary table's rows).
CPU_ONLY_NODE = "no GPUs (CPU-only node)"
CLASS_DROPPED = "class mapped to drop"
NO_WORKERS = "no workers"
CPU_ONLY_JOB = "no GPUs (CPU-only)"
UNEVEN = "GPUs do not split evenly over the workers"
SHARE = "a share of one GPU (tidal schedules whole GPUs)"
NO_RUN_TIME = "duration <= 0"


@dataclass(frozen=True, slots=True)
class TraceNode:
    name: str
    gpus: int
    gpu_model: str
    cpu_milli: int
    memory_mib: int
    preset: str
    preset_from: str  # which table chose the preset (cluster_model.FROM_*)


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace in the schema's units; ``gpus``, CPU and memory are per worker."""

    name: str
    job_class: str  # "online" or "batch"
    gpus: int
    workers: int
    cpu_milli: int
    memory_mib: int
    duration_s: float
    submit_s: float | None
    gpu_models: frozenset[str] = frozenset()  # model keys the job may run on; empty: any

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.workers


@dataclass
class SourceReport:
    """What one file gave: its format, rows read, rows kept, rows dropped by reason, and
    notes on what was assumed (absent columns and their defaults)."""

    kind: Kind
    location: str
    format: str
    rows: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.rows - self.drops.total()

    def drop(self, reason: str) -> None:
        self.drops[reason] += 1


def layout(kind: Kind, source: TraceSource, header: list[str]) -> Layout:
    """The source's format (named, or told by the header) with the scenario's changes."""
    base = _format(kind, source, header)
    classes = {**base.classes, **source.classes}
    return Layout(
        kind=kind,
        format=base,
        columns={**base.columns, **source.columns},
        explicit=frozenset(source.columns),
        units={**base.units, **source.units},
        defaults=dict(source.defaults),
        classes={str(value).casefold(): cls for value, cls in classes.items()},
        resources_per=source.resources_per or base.resources_per,
    )


def _format(kind: Kind, source: TraceSource, header: list[str]) -> TraceFormat:
    if source.format:
        return find_format(kind, source.format)
    guessed = guess_format(kind, header)
    if guessed is not None:
        return guessed
    if source.columns:
        return FORMATS[kind][-1]  # the tidal schema, with the scenario's column names
    raise DataError(
        f"{source.path}: cannot tell the {kind} format from the header ({', '.join(header)}): "
        f"set `{kind}: {{format: <name>}}` (one of {', '.join(format_names(kind))}) or map the "
        f"columns (`{kind}: {{columns: {{<field>: <column>}}}}`, fields in docs/traces.md)"
    )


Rows = Iterator[tuple[int, list[str]]]


@contextmanager
def _open(kind: Kind, source: TraceSource) -> Iterator[tuple[Table, Rows]]:
    with open_trace(source.path) as stream:
        header, numbered = rows(stream, source.path)
        if not header:
            raise DataError(f"{source.path}: empty file (expected a CSV header)")
        try:
            table = Table(source.path, layout(kind, source, header), header)
        except DataError:
            raise
        except ValueError as err:  # a format or unit the scenario check did not see
            raise DataError(f"{source.path}: {err}") from err
        yield table, numbered


# Fields whose default a report states when a file has no column for them: the ones that
# change what a row asks for or which class it is.
STATED_DEFAULTS = ("cpu_milli", "memory_mib", "class")


def _report(table: Table) -> SourceReport:
    kind = table.layout.kind
    report = SourceReport(kind, table.label, table.layout.format.name)
    for name in STATED_DEFAULTS:
        if name not in FIELDS[kind] or table.has(name):
            continue
        default = table.layout.defaults.get(name, FIELDS[kind][name].default)
        column = table.layout.columns.get(name)
        where = f"no column {column!r}" if column else f"no column for {name}"
        report.notes.append(
            f"{where}: {name} = {default!r} for every row "
            f"(`{kind}: {{defaults: {{{name}: ...}}}}` changes it)"
        )
    return report


# -- nodes ------------------------------------------------------------------------------------


def read_nodes(source: TraceSource, presets: PresetTable) -> tuple[list[TraceNode], SourceReport]:
    """A node list, each node with its topology preset."""
    with _open("nodes", source) as (table, numbered):
        report = _report(table)
        nodes: list[TraceNode] = []
        first_row: dict[str, int] = {}
        for n, cells in numbered:
            report.rows += 1
            node = _node(table, n, cells, presets, source.on_unmapped == "drop")
            if isinstance(node, str):
                report.drop(node)
                continue
            if node.name in first_row:
                first = first_row[node.name]
                raise table.bad(n, "name", node.name, f"duplicate node name (first on row {first})")
            first_row[node.name] = n
            nodes.append(node)
        if not nodes:
            raise DataError(f"{source.path}: no GPU nodes ({_dropped(report)})")
        return nodes, report


def _node(
    table: Table, n: int, cells: list[str], presets: PresetTable, drop_unmapped: bool
) -> TraceNode | str:
    name = table.text(n, cells, "name")
    gpus = _whole(table, n, cells, "gpus")
    if gpus == 0:
        return CPU_ONLY_NODE
    model = table.text(n, cells, "gpu_model")
    chosen = _preset(table, n, cells, model, gpus, presets)
    if isinstance(chosen, str):
        if drop_unmapped:
            return f"no topology preset for {gpus} x {model!r}"
        raise DataError(f"{table.label}: row {n}, column {table.column('gpu_model')!r}: {chosen}")
    return TraceNode(
        name=name,
        gpus=gpus,
        gpu_model=model,
        cpu_milli=int(table.number(n, cells, "cpu_milli")),
        memory_mib=int(table.number(n, cells, "memory_mib")),
        preset=chosen[0],
        preset_from=chosen[1],
    )


def _preset(
    table: Table, n: int, cells: list[str], model: str, gpus: int, presets: PresetTable
) -> tuple[str, str] | str:
    named = table.text(n, cells, "preset")
    if not named:
        return resolve(model, gpus, presets)
    if named not in preset_names():
        raise table.bad(n, "preset", named, f"unknown preset (known: {', '.join(preset_names())})")
    if preset_gpus(named) != gpus:
        raise table.bad(
            n, "preset", named, f"preset has {preset_gpus(named)} GPUs but the node has {gpus}"
        )
    return named, FROM_FILE


def _whole(table: Table, n: int, cells: list[str], name: str) -> int:
    value = table.number(n, cells, name)
    if value != int(value):
        raise table.bad(n, name, table.cell(n, cells, name) or "", "not a whole number")
    return int(value)


# -- jobs -------------------------------------------------------------------------------------


def read_jobs(source: TraceSource, need_submit: bool) -> tuple[list[TraceJob], SourceReport]:
    """A job or pod list: online and batch jobs with whole GPUs; everything else is counted
    by reason. ``need_submit``: the replay uses the trace's submission times."""
    with _open("jobs", source) as (table, numbered):
        _check_times(table, need_submit)
        report = _report(table)
        if not table.has("duration_s") and not (table.has("start_s") and table.has("end_s")):
            report.notes.append(
                f"no durations in the file: every job runs {table.layout.defaults['duration_s']} s "
                "(jobs.defaults.duration_s)"
            )
        per_job = table.layout.resources_per == "job"
        jobs: list[TraceJob] = []
        for n, cells in numbered:
            report.rows += 1
            job = _job(table, n, cells, per_job, need_submit)
            if isinstance(job, str):
                report.drop(job)
            else:
                jobs.append(job)
        return jobs, report


def _check_times(table: Table, need_submit: bool) -> None:
    """Durations are required (a default counts); submission times when the replay uses them."""
    defaults = table.layout.defaults
    has_span = table.has("start_s") and table.has("end_s")
    if not (table.has("duration_s") or has_span or "duration_s" in defaults):
        raise DataError(
            f"{table.label}: no job durations: no column for duration_s "
            f"({table.column('duration_s')!r}) nor for start_s and end_s "
            f"({table.column('start_s')!r}, {table.column('end_s')!r}). Map one "
            "(`jobs: {columns: {duration_s: <column>}}`) or state an assumption for every job "
            "(`jobs: {defaults: {duration_s: 3600}}`)"
        )
    if need_submit and not (table.has("submit_s") or "submit_s" in defaults):
        raise DataError(
            f"{table.label}: `arrivals: trace` replays submission times, but there is no column "
            f"for submit_s ({table.column('submit_s')!r}): map it "
            "(`jobs: {columns: {submit_s: <column>}}`) or use `arrivals: sampled`"
        )


def _job(
    table: Table, n: int, cells: list[str], per_job: bool, need_submit: bool
) -> TraceJob | str:
    job_class = _job_class(table, n, cells)
    if job_class == "drop":
        return CLASS_DROPPED
    workers = _whole(table, n, cells, "workers")
    if workers < 1:
        return NO_WORKERS
    gpus = table.number(n, cells, "gpus")
    if per_job:
        if gpus % workers:
            return UNEVEN
        gpus /= workers
    if gpus == 0:
        return CPU_ONLY_JOB
    if gpus != int(gpus) or (gpus == 1 and table.number(n, cells, "gpu_milli") < 1000):
        return SHARE
    duration = _duration(table, n, cells)
    if duration <= 0:
        return NO_RUN_TIME
    submit = table.time(n, cells, "submit_s")
    if need_submit and submit is None:
        raise table.bad(n, "submit_s", "", "empty, and `arrivals: trace` needs a submission time")
    share = workers if per_job else 1
    return TraceJob(
        name=table.text(n, cells, "name") or f"row-{n}",
        job_class=job_class,
        gpus=int(gpus),
        workers=workers,
        cpu_milli=int(table.number(n, cells, "cpu_milli") / share),
        memory_mib=int(table.number(n, cells, "memory_mib") / share),
        duration_s=duration,
        submit_s=submit,
        gpu_models=_models(table.text(n, cells, "gpu_model")),
    )


def _job_class(table: Table, n: int, cells: list[str]) -> str:
    value = table.cell(n, cells, "class")
    if value is None:
        return str(table.layout.defaults.get("class", "batch"))  # a class (scenario-checked)
    mapped = table.layout.classes.get(value.casefold())
    if mapped is None:
        known = ", ".join(sorted(table.layout.classes)) or "none"
        raise table.bad(
            n,
            "class",
            value,
            f"class not mapped (mapped: {known}); add `jobs: {{classes: {{{value}: batch}}}}` "
            "(online, batch or drop)",
        )
    return mapped


def _duration(table: Table, n: int, cells: list[str]) -> float:
    """The row's duration, else its end minus its start, else the scenario's default."""
    if table.has("duration_s"):
        duration = table.time(n, cells, "duration_s")
        if duration is not None:
            return duration
    if table.has("start_s") and table.has("end_s"):
        start, end = table.time(n, cells, "start_s"), table.time(n, cells, "end_s")
        if start is not None and end is not None:
            return end - start
    default = table.layout.defaults.get("duration_s")
    if default is not None:
        return float(default)
    raise DataError(
        f"{table.label}: row {n}: no duration ({table.column('duration_s')!r} is empty, or "
        f"{table.column('start_s')!r} and {table.column('end_s')!r} are) and no default "
        "(`jobs: {defaults: {duration_s: ...}}`)"
    )


def _models(text: str) -> frozenset[str]:
    return frozenset(model_key(m) for m in text.split("|") if m.strip())


# -- load -------------------------------------------------------------------------------------


def read_load(source: TraceSource) -> tuple[list[float], SourceReport]:
    """An online load curve summed per hour of day, scaled to a peak of 1.0 (24 values)."""
    with _open("load", source) as (table, numbered):
        report = _report(table)
        totals = [0.0] * 24
        for n, cells in numbered:
            report.rows += 1
            stamp = table.time(n, cells, "time_s")
            if stamp is None:
                raise table.bad(n, "time_s", "", "empty")
            totals[int(stamp // 3600) % 24] += table.number(n, cells, "value")
        peak = max(totals)
        if peak <= 0:
            raise DataError(f"{source.path}: column {table.column('value')!r} sums to zero")
        return [t / peak for t in totals], report


def _dropped(report: SourceReport) -> str:
    if not report.drops:
        return f"{report.rows} rows"
    reasons = ", ".join(f"{reason}: {count}" for reason, count in report.drops.most_common())
    return f"{report.rows} rows; dropped: {reasons}"

"""Loaders for the real traces in ``../shared/data`` (see its README): the openb GPU cluster
(nodes, pods) and the GenAI gateway's daily QPS curve. Errors name the file and the column."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# The openb trace has no GPU topology: each node gets a preset by GPU model and count.
# (The cluster model for traces without topology: one table, here.)
OPENB_PRESETS: dict[tuple[str, int], str] = {
    ("V100M16", 8): "dgx1-v100",
    ("V100M32", 8): "dgx1-v100",
    ("G2", 8): "pcie-8x-l40s",
    ("G3", 8): "pcie-8x-l40s",
}
BY_COUNT = {4: "a100-pcie-nvlink-pairs", 2: "pcie-2x", 1: "single-gpu"}


class DataError(ValueError):
    """A trace file is missing or malformed; the message names the file, row and column."""


@dataclass(frozen=True, slots=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str

    @property
    def preset(self) -> str:
        return OPENB_PRESETS.get((self.model, self.gpus)) or BY_COUNT[self.gpus]


@dataclass(frozen=True, slots=True)
class TracePod:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    qos: str
    duration_s: float


def openb_nodes(path: Path) -> list[TraceNode]:
    """GPU nodes of the openb node list (nodes with 1, 2, 4 or 8 whole GPUs)."""
    nodes = []
    for row, line in _rows(path, ("sn", "cpu_milli", "memory_mib", "gpu", "model")):
        gpus = _int(path, row, line, "gpu")
        if gpus in (1, 2, 4, 8):
            nodes.append(
                TraceNode(
                    name=line["sn"],
                    cpu_milli=_int(path, row, line, "cpu_milli"),
                    memory_mib=_int(path, row, line, "memory_mib"),
                    gpus=gpus,
                    model=line["model"],
                )
            )
    if not nodes:
        raise DataError(f"{path}: no GPU nodes with 1, 2, 4 or 8 GPUs")
    return nodes


def openb_batch_pods(path: Path) -> list[TracePod]:
    """BE and Burstable pods that use whole GPUs, as preemptible batch work. GPU-sharing pods
    (``gpu_milli`` < 1000 on one GPU) are left out: tidal schedules whole GPUs."""
    pods = []
    columns = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "qos")
    for row, line in _rows(path, (*columns, "creation_time", "deletion_time")):
        gpus = _int(path, row, line, "num_gpu")
        whole = gpus > 1 or (gpus == 1 and _int(path, row, line, "gpu_milli") >= 1000)
        if line["qos"] not in ("BE", "Burstable") or not whole:
            continue
        duration = _float(path, row, line, "deletion_time") - _float(
            path, row, line, "creation_time"
        )
        if duration > 0:
            pods.append(
                TracePod(
                    name=line["name"],
                    cpu_milli=_int(path, row, line, "cpu_milli"),
                    memory_mib=_int(path, row, line, "memory_mib"),
                    gpus=gpus,
                    qos=line["qos"],
                    duration_s=duration,
                )
            )
    if not pods:
        raise DataError(f"{path}: no BE/Burstable pods with whole GPUs")
    return pods


def hourly_load_shape(path: Path) -> list[float]:
    """The GenAI gateway's QPS summed per hour of day, scaled to a peak of 1.0 (24 values)."""
    totals = [0.0] * 24
    for row, line in _rows(path, ("timestamp_anon", "value")):
        stamp = _float(path, row, line, "timestamp_anon")
        value = _float(path, row, line, "value")
        totals[int(stamp // 3600) % 24] += value
    peak = max(totals)
    if peak <= 0:
        raise DataError(f"{path}: column 'value' sums to zero")
    return [t / peak for t in totals]


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read trace file: {err.strerror}") from err
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        yield from enumerate(reader, start=2)


def _int(path: Path, row: int, line: dict[str, str], column: str) -> int:
    return int(_float(path, row, line, column))


def _float(path: Path, row: int, line: dict[str, str], column: str) -> float:
    try:
        value = float(line[column])
    except (TypeError, ValueError) as err:
        raise DataError(
            f"{path}: row {row}, column {column!r}: not a number: {line[column]!r}"
        ) from err
    if not math.isfinite(value):
        raise DataError(f"{path}: row {row}, column {column!r}: not finite")
    return value

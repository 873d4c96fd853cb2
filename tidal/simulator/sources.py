"""Reading a trace table: open a path or URI (gzip-compressed files too), match its header to
the schema's fields, and read each row's fields in the schema's units.

Every error is a :class:`DataError` naming the file, and where it applies the row, the column,
the value and what to change in the scenario.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from tidal.simulator.data import DataError
from tidal.simulator.formats import FIELDS, Kind, TraceFormat, unit_factor

# Cells that mean "no value" in traces written by pandas, spreadsheets and databases.
EMPTY = frozenset({"", "nan", "NaN", "NAN", "None", "none", "null", "NULL", "NA", "N/A"})


@contextmanager
def open_trace(location: str) -> Iterator[IO[str]]:
    """A text stream over a trace file: a path, a ``file://`` URI, or any URI fsspec reads
    (``s3://``, ``https://``, ...) when it is installed. ``.gz`` files are decompressed."""
    scheme = urlparse(location).scheme
    if len(scheme) > 1 and scheme != "file":
        with _open_uri(location) as stream:
            yield stream
        return
    path = Path(unquote(urlparse(location).path)) if scheme == "file" else Path(location)
    try:
        stream = _open_local(path)
    except OSError as err:
        raise DataError(f"{location}: cannot read trace file: {err.strerror}") from err
    with stream:
        yield stream


def _open_local(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


@contextmanager
def _open_uri(location: str) -> Iterator[IO[str]]:
    try:
        import fsspec  # noqa: PLC0415  (optional: only URIs other than file:// need it)
    except ImportError as err:
        raise DataError(
            f"{location}: reading this URI needs fsspec (pip install 'tidal[worker]'), or "
            "download the file and give its path"
        ) from err
    try:
        stream = fsspec.open(
            location, "rt", encoding="utf-8-sig", newline="", compression="infer"
        ).open()
    except (OSError, ValueError) as err:
        raise DataError(f"{location}: cannot read trace file: {err}") from err
    with stream:
        yield stream


@dataclass(frozen=True)
class Layout:
    """A format with the scenario's changes applied: where each field is, and its unit."""

    kind: Kind
    format: TraceFormat
    columns: Mapping[str, str]  # field -> column
    explicit: frozenset[str]  # fields the scenario mapped itself (their column must exist)
    units: Mapping[str, str]
    defaults: Mapping[str, float | str]
    classes: Mapping[str, str]  # casefolded class value -> online|batch|drop
    resources_per: str


class Table:
    """One trace file's rows, read field by field."""

    def __init__(self, label: str, layout: Layout, header: list[str]) -> None:
        self.label = label
        self.layout = layout
        self.header = header
        position = {name: i for i, name in enumerate(header)}
        self.index: dict[str, int] = {}  # fields the file has a column for
        for name, column in layout.columns.items():
            if column in position:
                self.index[name] = position[column]
            elif name in layout.explicit or FIELDS[layout.kind][name].default is None:
                raise self.missing(name)
        fields = FIELDS[layout.kind]
        self.factor = {
            name: unit_factor(layout.kind, name, layout.units[name])
            if name in layout.units
            else 1.0
            for name in fields
            if fields[name].dimension not in ("text", "count")
        }

    def has(self, name: str) -> bool:
        """Whether the file has a column for field ``name`` (else rows take its default)."""
        return name in self.index

    def missing(self, name: str) -> DataError:
        column = self.layout.columns.get(name, name)
        return DataError(
            f"{self.label}: missing column {column!r} (field {name}, format "
            f"{self.layout.format.name}); the header has: {', '.join(self.header)}. Map the "
            f"field to a column with `{self.layout.kind}: {{columns: {{{name}: <column>}}}}`"
            + (
                ""
                if FIELDS[self.layout.kind][name].default is None
                else f" or give a default (`{self.layout.kind}: {{defaults: {{{name}: ...}}}}`)"
            )
        )

    def column(self, name: str) -> str:
        return self.layout.columns.get(name, name)

    def cell(self, row: int, cells: list[str], name: str) -> str | None:
        """The raw text of field ``name`` (None when empty or the column is absent)."""
        index = self.index.get(name)
        if index is None:
            return None
        if index >= len(cells):
            raise DataError(
                f"{self.label}: row {row}: {len(cells)} cells, but column "
                f"{self.column(name)!r} is number {index + 1} of the header"
            )
        text = cells[index].strip()
        return None if text in EMPTY else text

    def text(self, row: int, cells: list[str], name: str) -> str:
        value = self.cell(row, cells, name)
        if value is not None:
            return value
        return str(self._default(row, name))

    def number(self, row: int, cells: list[str], name: str) -> float:
        """Field ``name`` as a finite number >= 0 in the field's unit."""
        text = self.cell(row, cells, name)
        if text is None:
            return float(self._default(row, name))
        try:
            value = float(text)
        except ValueError:
            raise self.bad(row, name, text, "not a number") from None
        if not math.isfinite(value) or value < 0:
            raise self.bad(row, name, text, "must be a finite number >= 0")
        return value * self.factor.get(name, 1.0)

    def time(self, row: int, cells: list[str], name: str) -> float | None:
        """Field ``name`` in seconds: a number in the field's unit, or an ISO date and time
        (read as UTC). None when the row has no value and the scenario gives no default."""
        text = self.cell(row, cells, name)
        if text is None:
            default = self.layout.defaults.get(name, "")
            return None if default == "" else float(default)
        try:
            return float(text) * self.factor.get(name, 1.0)
        except ValueError:
            pass
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            raise self.bad(
                row, name, text, "not a time (seconds, or YYYY-MM-DD HH:MM:SS)"
            ) from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()

    def bad(self, row: int, name: str, value: str, problem: str) -> DataError:
        return DataError(
            f"{self.label}: row {row}, column {self.column(name)!r}: {problem}: {value!r}"
        )

    def _default(self, row: int, name: str) -> float | str:
        if name in self.layout.defaults:
            return self.layout.defaults[name]
        default = FIELDS[self.layout.kind][name].default
        if default is None:
            raise DataError(
                f"{self.label}: row {row}, column {self.column(name)!r}: empty, and the field "
                f"{name} needs a value (or a default: "
                f"`{self.layout.kind}: {{defaults: {{{name}: ...}}}}`)"
            )
        return default


def rows(stream: IO[str], label: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header (names stripped) and the data rows numbered as a spreadsheet shows them
    (the header is row 1); blank lines are skipped. A file that is not CSV text is a
    DataError naming the line."""
    reader = csv.reader(stream)

    def numbered() -> Iterator[tuple[int, list[str]]]:
        with _as_data_error(label, reader):
            for n, cells in enumerate(reader, start=2):
                if cells:
                    yield n, cells

    with _as_data_error(label, reader):
        header = [name.strip() for name in next(reader, [])]
    return header, numbered()


@contextmanager
def _as_data_error(label: str, reader: Any) -> Iterator[None]:
    try:
        yield
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(
            f"{label}: line {reader.line_num}: not a CSV text file (UTF-8): {err}"
        ) from err

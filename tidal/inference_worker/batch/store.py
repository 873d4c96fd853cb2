"""Input and output storage through fsspec: local paths, ``file://`` and ``s3://`` alike.

Every output file appears whole or not at all, so a reader (or a resumed attempt) never sees
half a part or half a checkpoint: on a local filesystem a file is written beside its final
name and renamed over it; on an object store it is uploaded in one put, which the store makes
visible only once complete. A part is staged in a local temporary file, not in memory: its size
is bounded by the checkpoint interval, not by the pod's memory.

S3 endpoints and credentials come from the environment botocore reads (``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, a pod's web identity, ...), so
a pod needs no tidal-specific storage settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec  # type: ignore[import-untyped, unused-ignore]
from fsspec.implementations.local import (  # type: ignore[import-untyped, unused-ignore]
    LocalFileSystem,
)

HASH_CHUNK = 1 << 20
LOCAL_PROTOCOLS = ("file", "local")


class ConfigError(ValueError):
    """The job's configuration cannot work (bad URI, missing input, checkpoint mismatch): the
    worker exits 2, and retrying the same pod cannot help."""


@dataclass(frozen=True)
class Part:
    """A closed output part, as a checkpoint lists it."""

    name: str
    lines: int
    sha256: str


def check_uri(uri: str, variable: str) -> None:
    """ValueError naming ``variable`` unless fsspec can open ``uri``'s protocol here."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol is None:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as error:
        raise ValueError(f"{variable}: cannot open {uri!r}: {error}") from error


def local_form(uri: str) -> str | None:
    """The absolute local path ``uri`` names, or None for a remote URI."""
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol is not None and protocol not in LOCAL_PROTOCOLS:
        return None
    return os.path.abspath(str(path))


def filesystem(uri: str, variable: str) -> tuple[Any, str]:
    """The filesystem and path of ``uri``; ConfigError naming ``variable`` when it fails."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError, OSError) as error:
        raise ConfigError(f"{variable}: cannot open {uri!r}: {error}") from error
    return fs, str(path).rstrip("/") or "/"


def _is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def input_files(uri: str, variable: str = "TIDAL_INPUT_URI") -> tuple[Any, list[str]]:
    """The input's files in reading order: ``uri`` itself, or every ``*.jsonl`` under it
    (recursively), sorted by path."""
    fs, path = filesystem(uri, variable)
    try:
        fs.invalidate_cache()  # a listing cached before another attempt wrote is stale
        if fs.isfile(path):
            return fs, [path]
        if fs.isdir(path):
            files = sorted(str(p) for p in fs.find(path) if str(p).endswith(".jsonl"))
            if files:
                return fs, files
            raise ConfigError(f"{variable}: no *.jsonl files under {uri!r}")
    except OSError as error:
        raise ConfigError(f"{variable}: cannot read {uri!r}: {error}") from error
    raise ConfigError(f"{variable}: {uri!r} does not exist")


def read_lines(fs: Any, files: list[str]) -> Iterator[bytes]:
    """Every line of ``files`` in order, as bytes: a line that is not UTF-8 is a bad record,
    not a decoding error that would stop the job."""
    for path in files:
        with fs.open(path, "rb") as handle:
            yield from handle


class PartFile:
    """An output part being written: lines go to a local staging file; :meth:`publish` makes
    it appear at its final path in one step."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.lines = 0
        self._hash = hashlib.sha256()
        # Local output: stage beside the final name so the rename stays on one filesystem.
        directory = store.root if store.local else None
        self._handle: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in publish)
            dir=directory, prefix=f".{name}.", suffix=".tmp", delete=False
        )

    def write(self, line: bytes) -> None:
        data = line.rstrip(b"\r\n") + b"\n"
        self._handle.write(data)
        self._hash.update(data)
        self.lines += 1

    def publish(self) -> Part:
        """Close the part and make it visible under its name, whole."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        try:
            self.store.publish_file(self._handle.name, self.name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._handle.name)
        return Part(self.name, self.lines, self._hash.hexdigest())

    def discard(self) -> None:
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._handle.name)


class Store:
    """The job's output location: parts at its root, checkpoints under ``_checkpoints/``.
    Names are relative to the root, ``/``-separated."""

    def __init__(self, uri: str, variable: str = "TIDAL_OUTPUT_URI") -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(uri, variable)
        self.local = _is_local(self.fs)
        if self.local:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as error:
                raise ConfigError(f"{variable}: cannot create {uri!r}: {error}") from error

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri_of(self, name: str) -> str:
        """The URI of ``name`` as a user (or TIDAL_RESUME_FROM) would write it."""
        return f"{self.uri}/{name}"

    def part(self, name: str) -> PartFile:
        return PartFile(self, name)

    def publish_file(self, local_path: str, name: str) -> None:
        """Make the local file ``local_path`` appear whole as ``name``."""
        target = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(local_path, target)
        else:
            self.fs.put_file(local_path, target)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole or not at all."""
        if not self.local:
            self.fs.pipe_file(self.path(name), data)
            return
        target = self.path(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=os.path.dirname(target), prefix=".", suffix=".tmp", delete=False
        ) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)

    def read_bytes(self, name: str) -> bytes:
        data: bytes = self.fs.cat_file(self.path(name))
        return data

    def names(self, directory: str) -> list[str]:
        """The file names (not paths) directly in ``directory``; none when it is absent."""
        path = self.path(directory)
        self.fs.invalidate_cache(path)  # the store is the truth, not this process's memory
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def sha256(self, name: str) -> str | None:
        """The sha256 of ``name``'s content, or None when it does not exist."""
        digest = hashlib.sha256()
        try:
            with self.fs.open(self.path(name), "rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()


def read_uri(uri: str, variable: str) -> bytes:
    """The content of the file at ``uri`` (FileNotFoundError when absent)."""
    fs, path = filesystem(uri, variable)
    fs.invalidate_cache()
    data: bytes = fs.cat_file(path)
    return data

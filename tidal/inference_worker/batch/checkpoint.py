"""Checkpoints: what a shard has finished, so a later attempt resumes exactly once.

``{output}/_checkpoints/shard-{i}/ckpt-{k:06d}.json`` holds the input and shard it belongs to,
``next_record`` (how many of the shard's records are done: the shard's records in input order
are the input's records r with r % n == i), and every part written so far, in order, with its
line count and sha256. The parts a checkpoint lists, concatenated, are the output of records
``0 .. next_record - 1``; a part it does not list (written by an attempt killed before its next
checkpoint) is ignored, and those records are redone. ``complete`` marks the shard finished.

Where to resume: the latest checkpoint in the output store. TIDAL_RESUME_FROM (the URI the
previous attempt annotated on its pod) is a hint: the annotation can lag the store (a patch
that failed, a pod killed between the two writes), so when the store holds checkpoints the
latest of them wins, even over an older hint. The hint decides only when the store has none,
and then it must exist: the operator saw progress that this output location does not have.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from tidal.inference_worker.batch.store import ConfigError, Part, Store, read_uri

log = logging.getLogger(__name__)

CHECKPOINTS = "_checkpoints"
NAME = re.compile(r"ckpt-(\d{6,})\.json")


def shard_dir(index: int) -> str:
    return f"{CHECKPOINTS}/shard-{index}"


def checkpoint_name(index: int, k: int) -> str:
    return f"{shard_dir(index)}/ckpt-{k:06d}.json"


def checkpoint_number(file_name: str) -> int | None:
    """``k`` of ``ckpt-{k}.json``, None for any other name (a staging file, say)."""
    match = NAME.fullmatch(file_name)
    return int(match.group(1)) if match else None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Checkpoint:
    input_uri: str
    shard: str  # "i/n", as TIDAL_SHARD spells it
    next_record: int
    parts: tuple[Part, ...]
    model: str
    attempt: int
    created: str = field(default_factory=now)
    complete: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "input_uri": self.input_uri,
                "shard": self.shard,
                "next_record": self.next_record,
                "parts": [
                    {"name": p.name, "lines": p.lines, "sha256": p.sha256} for p in self.parts
                ],
                "model": self.model,
                "attempt": self.attempt,
                "created": self.created,
                "complete": self.complete,
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Checkpoint:
        """The checkpoint in ``data``; ConfigError saying what is wrong with ``where``."""
        try:
            value = orjson.loads(data)
            return cls(
                input_uri=_typed(value, "input_uri", str),
                shard=_typed(value, "shard", str),
                next_record=_typed(value, "next_record", int),
                parts=tuple(_part(p) for p in _typed(value, "parts", list)),
                model=_typed(value, "model", str),
                attempt=_typed(value, "attempt", int),
                created=_typed(value, "created", str),
                complete=bool(value.get("complete", False)),
            )
        except (orjson.JSONDecodeError, TypeError, AttributeError) as error:
            raise ConfigError(f"checkpoint {where} is not valid: {error}") from error


def _typed(value: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    item = value.get(key)
    # bool is an int to Python, never a count.
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise TypeError(f"{key} must be a {kind.__name__}, got {item!r}")
    return item


def _part(value: Mapping[str, Any]) -> Part:
    return Part(
        _typed(value, "name", str), _typed(value, "lines", int), _typed(value, "sha256", str)
    )


@dataclass(frozen=True)
class Resume:
    """Where an attempt starts: the checkpoint (None: from scratch), its URI, and the number
    the attempt's first checkpoint takes."""

    checkpoint: Checkpoint | None
    uri: str | None
    next_number: int


def latest_in_store(store: Store, index: int) -> tuple[int, str] | None:
    """The number and name of the newest checkpoint of shard ``index``."""
    numbered = [
        (k, f"{shard_dir(index)}/{file_name}")
        for file_name in store.names(shard_dir(index))
        if (k := checkpoint_number(file_name)) is not None
    ]
    return max(numbered) if numbered else None


def find_resume(store: Store, index: int, hint: str | None) -> Resume:
    """The checkpoint to resume shard ``index`` from (see the module's docstring)."""
    latest = latest_in_store(store, index)
    if latest is not None:
        k, name = latest
        uri = store.uri_of(name)
        if hint and hint.rstrip("/") != uri:
            log.info("TIDAL_RESUME_FROM is %s; resuming from the store's latest, %s", hint, uri)
        return Resume(Checkpoint.from_json(store.read_bytes(name), uri), uri, k + 1)
    if not hint:
        return Resume(None, None, 0)
    try:
        data = read_uri(hint, "TIDAL_RESUME_FROM")
    except FileNotFoundError as error:
        raise ConfigError(
            f"TIDAL_RESUME_FROM: {hint!r} does not exist, and {store.uri_of(shard_dir(index))} "
            "holds no checkpoint (is TIDAL_OUTPUT_URI the job's output?)"
        ) from error
    hinted = Checkpoint.from_json(data, hint)
    return Resume(hinted, hint, _hinted_number(hint))


def _hinted_number(uri: str) -> int:
    k = checkpoint_number(uri.rsplit("/", 1)[-1])
    return 0 if k is None else k + 1


def verify(
    checkpoint: Checkpoint, where: str, store: Store, input_uri: str, shard: str, model: str
) -> None:
    """ConfigError unless ``checkpoint`` belongs to this input and shard and every part it
    lists is in the store, unchanged."""
    if checkpoint.input_uri.rstrip("/") != input_uri.rstrip("/"):
        raise ConfigError(
            f"TIDAL_INPUT_URI is {input_uri!r}, but checkpoint {where} is of "
            f"{checkpoint.input_uri!r}: refusing to mix two inputs in one output"
        )
    if checkpoint.shard != shard:
        raise ConfigError(
            f"TIDAL_SHARD is {shard!r}, but checkpoint {where} is of shard {checkpoint.shard!r}"
        )
    if checkpoint.model != model:
        log.warning(
            "checkpoint %s was written by model %r, this attempt runs %r",
            where,
            checkpoint.model,
            model,
        )
    written = sum(part.lines for part in checkpoint.parts)
    if written != checkpoint.next_record:
        raise ConfigError(
            f"checkpoint {where}: its parts hold {written} lines, "
            f"but next_record is {checkpoint.next_record}"
        )
    for part in checkpoint.parts:
        _verify_part(store, part, where)


def _verify_part(store: Store, part: Part, where: str) -> None:
    digest = store.sha256(part.name)
    if digest is None:
        raise ConfigError(f"checkpoint {where} lists {store.uri_of(part.name)}, which is missing")
    if digest != part.sha256:
        raise ConfigError(
            f"checkpoint {where} lists {store.uri_of(part.name)} with sha256 {part.sha256}, "
            f"but it has {digest} (changed after the checkpoint)"
        )

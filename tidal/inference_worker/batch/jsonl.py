"""The OpenAI Batch file format (pure): input lines in, output lines out, shard assignment.

An input line is ``{"custom_id", "method": "POST", "url", "body"}``. Every non-empty line is a
record, good or bad: a bad one (not JSON, no custom_id, another method, an unknown url, a body
that is not an object) becomes an error line in the output and never stops the job, so a
user's one broken line costs one line, not the job. As in vLLM's ``run_batch.py``, an answer
with an HTTP error status is an ordinary output line whose body is the error body.

Output ids are derived from the record, not drawn at random, so a record redone after a resume
is byte-identical to the first try (given the seed this module adds when the body has none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
METHOD = "POST"
BAD_LINE_STATUS = 400
SEED_RANGE = 2**31  # what every sampler accepts as a seed


@dataclass(frozen=True)
class Record:
    """One record of a shard: ``ordinal`` counts the shard's records (0, 1, ...), ``number``
    counts every record of the input (the ``number``-th non-empty line over all files)."""

    ordinal: int
    number: int
    line: bytes


@dataclass(frozen=True)
class Request:
    """A well-formed input line."""

    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    """A line that is not a request; ``custom_id`` when the line had a usable one."""

    custom_id: str | None
    code: str
    message: str


def shard_records(
    lines: Iterable[bytes], index: int, count: int, start: int = 0
) -> Generator[Record, None, None]:
    """The records of shard ``index`` of ``count`` (numbers r with r % count == index), from
    the shard's ``start``-th on. Blank lines are not records."""
    number = 0
    for line in lines:
        if not line.strip():
            continue
        if number % count == index:
            ordinal = number // count
            if ordinal >= start:
                yield Record(ordinal, number, line)
        number += 1


def parse_line(line: bytes) -> Request | BadLine:
    """The request on ``line``, or why it is not one."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        return BadLine(None, "invalid_json", f"line is not JSON: {error}")
    if not isinstance(value, dict):
        return BadLine(None, "invalid_json", "line is not a JSON object")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(None, "missing_custom_id", "custom_id must be a non-empty string")
    return _check_request(custom_id, value)


def _check_request(custom_id: str, value: dict[str, Any]) -> Request | BadLine:
    method, url, body = value.get("method"), value.get("url"), value.get("body")
    if method != METHOD:
        return BadLine(custom_id, "invalid_method", f"method must be {METHOD}, got {method!r}")
    if url not in URLS:
        return BadLine(custom_id, "invalid_url", f"url must be one of {list(URLS)}, got {url!r}")
    if not isinstance(body, dict):
        return BadLine(custom_id, "invalid_body", "body must be a JSON object")
    return Request(custom_id, str(url), body)


def seed_for(custom_id: str) -> int:
    """A seed that depends on the custom_id alone, so a redone record samples the same."""
    digest = hashlib.sha256(custom_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def with_seed(request: Request) -> dict[str, Any]:
    """The body to send: the caller's, with a stable seed when it names none (not mutated)."""
    if request.body.get("seed") is not None:
        return request.body
    return {**request.body, "seed": seed_for(request.custom_id)}


def _ids(number: int, custom_id: str | None) -> tuple[str, str]:
    """The line's ``id`` and ``request_id``: stable across redos, distinct per record even
    when custom_ids repeat (the record number is part of the key)."""
    digest = hashlib.sha256(f"{number}\0{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}", f"batch-{digest[32:]}"


def response_line(number: int, custom_id: str, status: int, body: dict[str, Any]) -> bytes:
    """The output line for an answered request (any status: an error status carries the error
    body, as OpenAI's batch output does)."""
    line_id, request_id = _ids(number, custom_id)
    return orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_line(number: int, bad: BadLine) -> bytes:
    """The output line for a line that is not a request."""
    line_id, request_id = _ids(number, bad.custom_id)
    return orjson.dumps(
        {
            "id": line_id,
            "custom_id": bad.custom_id,
            "response": {"status_code": BAD_LINE_STATUS, "request_id": request_id, "body": None},
            "error": {"code": bad.code, "message": bad.message},
        }
    )

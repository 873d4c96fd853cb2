"""Server-sent events as OpenAI streams them: one ``data: <json>`` event per chunk, then
``data: [DONE]``."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    """One event; orjson's JSON has no newlines, so it never splits the frame."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"

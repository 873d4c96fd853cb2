"""Output text of a sequence, step by step (pure): what to send now, and whether a stop string
ended it. Text that might be the start of a stop string (or half of a UTF-8 character) is held
back until the next token decides, so a client never sees a stop string or a broken character
(vLLM does the same)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class TextStep:
    delta: str  # new text to send
    stopped: bool  # a stop string was found (the text ends before it)


def next_text(text: str, sent: str, stops: Sequence[str], final: bool) -> TextStep:
    """``text`` is the whole output decoded so far, ``sent`` what the client has. ``final``:
    the sequence ends now for another reason, so nothing is held back."""
    searched_from = max(0, len(sent) - max((len(s) for s in stops), default=0))
    cut = min((i for s in stops if (i := text.find(s, searched_from)) >= 0), default=-1)
    if cut >= 0:
        return TextStep(text[len(sent) : cut] if cut > len(sent) else "", True)
    end = len(text)
    if not final:
        end -= _held(text, stops)
    return TextStep(text[len(sent) : end] if end > len(sent) else "", False)


def _held(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold: the longest suffix of ``text`` that begins a stop
    string, or an incomplete character at the end."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    if text.endswith(REPLACEMENT):
        held = max(held, len(text) - len(text.rstrip(REPLACEMENT)))
    return held

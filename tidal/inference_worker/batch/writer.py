"""Results that finish in any order, written in input order (after vLLM's
OrderedStreamingWriter).

Records run concurrently so the engine can batch them, and finish in any order; the output is
in input order, so "records done" is a single integer (:attr:`OrderedWriter.next`) and a
checkpoint is just that integer plus the parts written so far. Results that finish ahead of
the oldest unfinished one wait in a buffer; :meth:`OrderedWriter.wait_for_room` keeps that
buffer bounded (a slow head record holds back new dispatches, not memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class OrderedWriter(Generic[T]):
    """Hands ``sink`` the results of indices ``start, start + 1, ...`` in that order.

    ``window``: how far past :attr:`next` an index may be; at most ``window - 1`` results wait
    in the buffer at any time. Dispatch index ``i`` only after ``await wait_for_room(i)``.
    """

    def __init__(self, sink: Callable[[T], None], *, window: int, start: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._sink = sink
        self.window = window
        self._next = start
        self._waiting: dict[int, T] = {}
        self._advanced = asyncio.Event()

    @property
    def next(self) -> int:
        """The first index not yet handed to the sink: every index before it was."""
        return self._next

    @property
    def buffered(self) -> int:
        """Results finished ahead of :attr:`next`, waiting for it."""
        return len(self._waiting)

    def has_room(self, index: int) -> bool:
        return index < self._next + self.window

    async def wait_for_room(self, index: int) -> None:
        """Return once ``index`` is inside the window (the head has moved far enough)."""
        while not self.has_room(index):
            # Event.set wakes every waiter at once, so clearing here cannot lose a wake-up.
            self._advanced.clear()
            await self._advanced.wait()

    def put(self, index: int, result: T) -> None:
        """Record ``index``'s result; hand the sink every result now in order."""
        if index < self._next or index in self._waiting:
            raise ValueError(f"index {index} was already put")
        if not self.has_room(index):
            raise ValueError(
                f"index {index} is outside the window [{self._next}, {self._next + self.window})"
            )
        self._waiting[index] = result
        moved = False
        while self._next in self._waiting:
            self._sink(self._waiting.pop(self._next))
            self._next += 1
            moved = True
        if moved:
            self._advanced.set()

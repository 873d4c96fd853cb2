"""Small helpers for e2e tests: polling with a readable failure, binaries or skip."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from tidal.devcluster import Binaries, DevClusterError, find_binaries

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], what: str, timeout_s: float = 30.0, every_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def binaries_or_skip() -> Binaries:
    """The cached control-plane binaries; without them skip, unless TIDAL_E2E=require (CI)."""
    try:
        return find_binaries()
    except DevClusterError as error:
        if os.environ.get("TIDAL_E2E") == "require":
            raise
        pytest.skip(str(error))

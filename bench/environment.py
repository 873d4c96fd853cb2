"""The machine stamp every benchmark writes beside its results: numbers from a shared 2-core
VM and a GPU box are only comparable with it."""

from __future__ import annotations

import os
import platform


def machine() -> dict[str, object]:
    stamp: dict[str, object] = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import torch  # noqa: PLC0415 (only the worker's benchmarks have it)
    except ImportError:
        return stamp
    return {**stamp, "torch": torch.__version__}

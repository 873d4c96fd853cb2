"""The inference worker's offline batch runner: OpenAI Batch files in, ordered output parts and
checkpoints out, through fsspec (local paths, ``file://``, ``s3://``).

``tidal worker batch`` reads :class:`BatchSettings` from the pod's TIDAL_* variables and calls
:func:`main` (or :func:`run_until_signalled` inside its own event loop) with ``respond``, the
per-record work (the OpenAI server's ``complete``).
"""

from tidal.inference_worker.batch.podnote import annotate_checkpoint
from tidal.inference_worker.batch.runner import (
    EXIT_COMPLETE,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_STOPPED,
    BatchResult,
    BatchSettings,
    Respond,
    main,
    run_batch,
    run_until_signalled,
)

__all__ = [
    "EXIT_COMPLETE",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_STOPPED",
    "BatchResult",
    "BatchSettings",
    "Respond",
    "annotate_checkpoint",
    "main",
    "run_batch",
    "run_until_signalled",
]

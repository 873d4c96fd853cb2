"""Where the bundled traces live, and the one error every trace loader raises.

The bundled traces (openb nodes and pods, the GenAI gateway's daily QPS) are read from a data
folder beside the checkout (``data_dir`` or ``TIDAL_DATA_DIR``); a scenario may name its own
files instead (:mod:`tidal.simulator.traces`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class DataError(ValueError):
    """A trace file is missing or malformed; the message names the file, row, column and value,
    and says what to change."""

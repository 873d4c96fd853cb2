"""The worker's options (pure): the values the operator's pods pass (``TIDAL_*`` environment,
see ``tidal/operator/pods.py``) and the engine flags, validated at start with messages that
name the variable or flag (a bad value stops the worker before it loads anything)."""

from __future__ import annotations

import re

DTYPES = ("float32", "bfloat16", "float16")
# The CRD's attention values, and the worker's own names for them: ``fp16`` is attention in
# the model's dtype, which SDPA computes; ``int8`` is the Triton INT8 kernel.
ATTENTION = {"sdpa": "sdpa", "fp16": "sdpa", "int8": "int8"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


class SettingsError(ValueError):
    """A bad option; the message names it."""


def parse_bytes(text: str, what: str) -> int:
    """Bytes of ``"4GiB"``, ``"512Mi"``, ``"2G"`` or ``"1000"`` (Kubernetes quantity units:
    Ki/Mi/Gi/Ti are powers of 2, K/M/G/T of 10; a trailing B is optional)."""
    match = _SIZE.match(text)
    if match is None:
        raise SettingsError(f"{what}: {text!r} is not a size such as 4GiB or 512MiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def attention_backend(value: str, what: str = "TIDAL_ATTENTION") -> str:
    try:
        return ATTENTION[value]
    except KeyError:
        raise SettingsError(f"{what}: {value!r} is not one of {', '.join(ATTENTION)}") from None


def dtype_name(value: str, what: str = "TIDAL_DTYPE") -> str:
    if value == "int8":
        raise SettingsError(
            f"{what}: int8 weights are not supported by this worker yet; use bfloat16 or float16"
            " (attention: int8 quantizes attention)"
        )
    if value not in DTYPES:
        raise SettingsError(f"{what}: {value!r} is not one of {', '.join(DTYPES)}")
    return value

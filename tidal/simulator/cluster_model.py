"""The cluster model for traces without topology: each node gets a topology preset by its GPU
model and GPU count (docs/traces.md, "GPU models and topology presets").

One table in the code, and a scenario's ``presets`` beside it: a key is a GPU model (for that
model's nodes with the preset's GPU count; other counts of a model the scenario names need
their own ``MODEL/COUNT`` key) or ``MODEL/COUNT``. The scenario's entries win over the
built-in ones; a node whose model neither table names gets a preset by GPU count alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from tidal.topology import load_preset, preset_names

# GPU models named in public traces, by (model, GPU count). openb's G2/G3 are undisclosed PCIe
# GPUs (served as the dual-socket PCIe preset); V100 8-GPU servers are DGX-1 cube-meshes.
BUILTIN_PRESETS: dict[tuple[str, int], str] = {
    ("V100M16", 8): "dgx1-v100",
    ("V100M32", 8): "dgx1-v100",
    ("G2", 8): "pcie-8x-l40s",
    ("G3", 8): "pcie-8x-l40s",
    ("A100-SXM4-80GB", 8): "hgx-a100",
    ("A100-SXM4-40GB", 8): "hgx-a100",
    ("H100-SXM", 8): "dgx-h100",
    ("H100-SXM5-80GB", 8): "dgx-h100",
    ("H100", 8): "dgx-h100",
    ("L40S", 8): "pcie-8x-l40s",
    ("RTX4090", 8): "rtx4090-8x",
    ("V100-SXM2-32GB", 8): "dgx1-v100",
    ("V100-SXM2-16GB", 8): "dgx1-v100",
}

# Any model, by GPU count alone: 4-GPU servers as NVLink-bridge pairs, 2-GPU as one PCIe
# switch, 1 GPU as trivial.
BY_COUNT: dict[int, str] = {4: "a100-pcie-nvlink-pairs", 2: "pcie-2x", 1: "single-gpu"}

FROM_SCENARIO = "scenario presets"
FROM_MODEL = "built-in model table"
FROM_COUNT = "built-in, by GPU count"
FROM_FILE = "the node list's preset column"


def model_key(model: str) -> str:
    """GPU models compare without case or surrounding space ("a100-sxm4-80gb" is A100-SXM4-80GB)."""
    return model.strip().casefold()


@cache
def preset_gpus(name: str) -> int:
    return load_preset(name).gpu_count


@cache
def _builtin() -> dict[tuple[str, int], str]:
    """The table above plus each preset's own GPU model name (``NVIDIA H100 80GB HBM3`` with 8
    GPUs is dgx-h100)."""
    table = {(model_key(m), n): p for (m, n), p in BUILTIN_PRESETS.items()}
    for name in preset_names():
        topology = load_preset(name)
        table.setdefault((model_key(topology.gpu_model), topology.gpu_count), name)
    return table


@dataclass(frozen=True)
class PresetTable:
    """A scenario's ``presets`` parsed: (model key, GPU count or None for any) -> preset."""

    entries: Mapping[tuple[str, int | None], str]
    written: Mapping[tuple[str, int | None], str]  # the keys as the scenario wrote them

    @staticmethod
    def parse(presets: Mapping[str, str]) -> PresetTable:
        """ValueError names a bad key or an unknown preset."""
        entries: dict[tuple[str, int | None], str] = {}
        written: dict[tuple[str, int | None], str] = {}
        for key, preset in presets.items():
            if preset not in preset_names():
                raise ValueError(
                    f"{key!r}: unknown preset {preset!r} (known: {', '.join(preset_names())})"
                )
            model, count = split_key(str(key))
            if count is not None and preset_gpus(preset) != count:
                raise ValueError(
                    f"{key!r}: preset {preset} has {preset_gpus(preset)} GPUs, not {count}"
                )
            entries[(model_key(model), count)] = preset
            written[(model_key(model), count)] = str(key)
        return PresetTable(entries, written)


def split_key(key: str) -> tuple[str, int | None]:
    """``"H800/4"`` -> ("H800", 4); ``"H800"`` -> ("H800", None)."""
    model, _, count = key.rpartition("/")
    if model and count.isdigit():
        return model, int(count)
    return key, None


def resolve(model: str, gpus: int, table: PresetTable) -> tuple[str, str] | str:
    """(preset, where the choice came from), or a message saying why there is none and what to
    add to the scenario."""
    key = model_key(model)
    exact = table.entries.get((key, gpus))
    if exact is not None:
        return exact, FROM_SCENARIO
    any_count = table.entries.get((key, None))
    if any_count is not None:
        # The scenario names this model's topology: a count it did not foresee is a question
        # for the user, not a guess by count.
        if preset_gpus(any_count) == gpus:
            return any_count, FROM_SCENARIO
        return _no_preset(model, gpus, any_count)
    builtin = _builtin().get((key, gpus))
    if builtin is not None:
        return builtin, FROM_MODEL
    if gpus in BY_COUNT:
        return BY_COUNT[gpus], FROM_COUNT
    return _no_preset(model, gpus, any_count)


def _no_preset(model: str, gpus: int, any_count: str | None) -> str:
    fitting = sorted(n for n in preset_names() if preset_gpus(n) == gpus)
    if not fitting:
        return (
            f"no topology preset has {gpus} GPUs ({gpus} x {model!r}): drop such nodes with "
            "`nodes: {on_unmapped: drop}`, or add a preset file for them"
        )
    if not model:
        return (
            f"a node of {gpus} GPUs with no GPU model: name its preset in a `preset` column, or "
            f"give its model and map it (`presets: {{<model>: {suggest(model, gpus)}}}`; "
            f"{gpus}-GPU presets: {', '.join(fitting)})"
        )
    if any_count is not None:
        return (
            f"presets maps {model!r} to {any_count} ({preset_gpus(any_count)} GPUs) but this node "
            f'has {gpus}: add `presets: {{"{model}/{gpus}": {suggest(model, gpus)}}}` to the '
            f"scenario ({gpus}-GPU presets: {', '.join(fitting)})"
        )
    return (
        f"no topology preset for {gpus} x {model!r}: add `presets: {{{model}: "
        f"{suggest(model, gpus)}}}` to the scenario ({gpus}-GPU presets: {', '.join(fitting)}; "
        "`tidal topo list` describes them)"
    )


# Model-name hints for the suggestion in an error message only (never applied silently).
_HINTS = (
    (("H100", "H800", "H200", "H20"), "dgx-h100"),
    (("A100", "A800"), "hgx-a100"),
    (("V100",), "dgx1-v100"),
    (("4090",), "rtx4090-8x"),
    (("L40", "L20", "A10", "A30", "A40", "T4", "L4"), "pcie-8x-l40s"),
)


def suggest(model: str, gpus: int) -> str:
    """A plausible preset for an unmapped model, for the error message."""
    upper = model.upper()
    for needles, preset in _HINTS:
        if any(n in upper for n in needles) and preset_gpus(preset) == gpus:
            return preset
    fitting = sorted(n for n in preset_names() if preset_gpus(n) == gpus)
    return fitting[0] if fitting else "<preset>"

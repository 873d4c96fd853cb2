"""Topology presets: node shapes shipped as YAML data files beside this module."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from tidal.topology.model import NodeTopology, TopologyError, build_topology
from tidal.topology.shape import NodeShape, compile_shape

_PRESET_PACKAGE = "tidal.topology.preset_data"


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted."""
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


@cache
def load_preset(name: str) -> NodeTopology:
    """The bundled preset ``name``; a :class:`TopologyError` lists the known names otherwise."""
    if name not in preset_names():
        raise TopologyError(f"unknown topology preset {name!r}; known: {', '.join(preset_names())}")
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return parse_topology(text, source=f"preset {name}.yaml")


@cache
def preset_shape(name: str) -> NodeShape:
    """The compiled shape of preset ``name``, built once per process (shapes are immutable)."""
    return compile_shape(load_preset(name))


def parse_topology(text: str, source: str) -> NodeTopology:
    """A topology from YAML text in the preset schema; ``source`` names it in errors."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TopologyError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise TopologyError(f"{source}: expected a mapping at the top level")
    return build_topology(spec, source)

"""The public contract lives in tidal.api alone: its codec, and a scan that fails when a module
spells one of its names itself (how the CRDs once came to accept a tier the extender refused)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tidal import api
from tidal.operator.crds import TOPOLOGY_MODES, WORKLOAD_TIERS, custom_resource_definitions
from tidal.placement import TopologyMode
from tidal.topology import Tier

PACKAGE = Path(__file__).resolve().parents[1] / "tidal"
# Literals that are the contract's values; a module must import them from tidal.api.
CONTRACT = ("tidal.dev", "v1alpha1", "tidal-scheduler", "nvidia.com/gpu")


def test_gpu_lists_round_trip_and_bad_ones_say_why() -> None:
    assert api.format_gpu_list([3, 0, 1]) == "0,1,3"
    assert api.parse_gpu_list("0,1,3") == (0, 1, 3)
    assert api.parse_gpu_list(" 2 , 1 ") == (1, 2)
    assert api.parse_gpu_list("") == ()
    for text, problem in (("a,b", "expected GPU indices"), ("1,1", "distinct"), ("-1", "distinct")):
        with pytest.raises(ValueError, match=problem):
            api.parse_gpu_list(text)
    with pytest.raises(ValueError, match=r"0\.\.7"):
        api.parse_gpu_list("8", gpu_count=8)


def test_the_crds_offer_exactly_what_the_scheduler_accepts() -> None:
    assert [mode.value for mode in TopologyMode] == TOPOLOGY_MODES
    assert [tier.label for tier in Tier if tier is not Tier.RACK] == WORKLOAD_TIERS
    service = next(
        crd for crd in custom_resource_definitions() if crd["spec"]["names"]["kind"] == "LLMService"
    )
    schema = service["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    topology = schema["properties"]["spec"]["properties"]["topology"]["properties"]
    assert topology["mode"]["enum"] == TOPOLOGY_MODES
    assert topology["tier"]["enum"] == WORKLOAD_TIERS


def _contract_literals(path: Path) -> list[str]:
    """String constants (not docstrings) in ``path`` that spell a contract value."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            text = node.value
            if any(text == value or text.startswith(value + "/") for value in CONTRACT):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text!r}")
    return found


def test_no_module_spells_the_contract_itself() -> None:
    offenders = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "api.py" and "v1beta1" not in path.parts
        for hit in _contract_literals(path)
    ]
    assert offenders == []

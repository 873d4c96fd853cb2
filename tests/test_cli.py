from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidal.cli import app
from tidal.topology import preset_names

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("preset", preset_names())
def test_topo_show_prints_matrix_and_domains(preset: str) -> None:
    result = runner.invoke(app, ["topo", "show", preset], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "GPU link matrix" in result.output and "pcie-switch" in result.output


def test_topo_show_dgx_h100_has_nvswitch_links() -> None:
    result = runner.invoke(app, ["topo", "show", "dgx-h100"], env={"COLUMNS": "200"})
    assert result.output.count("NV18") == 8 * 7


def test_topo_show_unknown_preset_is_a_usage_error() -> None:
    result = runner.invoke(app, ["topo", "show", "nope"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unknown topology preset 'nope'" in result.output


def test_plan_compares_policies_side_by_side() -> None:
    result = runner.invoke(
        app, ["plan", str(EXAMPLES / "plan-two-cliques.yaml")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    rows = {
        line.split("│")[1].strip(): line
        for line in result.output.splitlines()
        if line.count("│") > 5
    }
    assert "[4, 5, 6, 7]" in rows["tidal"] and "nvlink" in rows["tidal"]
    assert "[2, 3, 6, 7]" in rows["b0-default"] and "node" in rows["b0-default"]


def test_plan_with_bad_scenario_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{name: a, preset: dgx-z}]\nrequest: {name: r, gpus: 1, priority: 1}\n")
    result = runner.invoke(app, ["plan", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unknown topology preset 'dgx-z'" in result.output


def test_every_subcommand_has_help() -> None:
    for args in (
        ["--help"],
        ["topo", "--help"],
        ["topo", "show", "--help"],
        ["topo", "list", "--help"],
        ["plan", "--help"],
        ["simulate", "--help"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_plan_scenario_missing_field_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{name: a, preset: dgx-h100}]\n")
    result = runner.invoke(app, ["plan", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "missing field 'request'" in result.output


def test_evaluate_takes_seeds_or_a_seed_count_not_both(tmp_path: Path) -> None:
    both = runner.invoke(app, ["evaluate", "--seed", "7", "--seeds", "3", "--out", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output
    none = runner.invoke(app, ["evaluate", "--seeds", "0", "--out", str(tmp_path)])
    assert none.exit_code == 2
    assert not (tmp_path / "evaluation.md").exists()

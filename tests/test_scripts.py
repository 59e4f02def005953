"""The example, research and benchmark scripts are not run by the suite (each takes minutes to
hours), but they must at least parse on the Python CI runs: a syntax error that only a newer Python
accepts (e.g. nested quotes in an f-string, 3.12+) once reached main in what is now
research/gate_pareto.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("research/*.py"), *ROOT.glob("benchmarks/*.py"),
                  ROOT / "cli.py"])


def test_scripts_found():
    names = {p.name for p in SCRIPTS}
    assert {"gate_pareto.py", "fit_bake_verify.py", "cli.py"} <= names and len(SCRIPTS) > 5


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_parses(path):
    ast.parse(path.read_text(), filename=str(path))

"""Every absl entry point of experiments/ starts: its flags parse and its help is its docstring."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = tuple(sorted(path.stem for path in (ROOT / "experiments").glob("*.py")
                            if "app.run(" in path.read_text()))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_prints_its_help(name):
    result = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "Traceback" not in result.stderr, result.stderr
    source = (ROOT / "experiments" / f"{name}.py").read_text()
    summary = ast.get_docstring(ast.parse(source)).splitlines()[0]
    assert summary in result.stdout

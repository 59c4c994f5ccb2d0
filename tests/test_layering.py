"""The package's layering, read from the source: which modules may import which (issue 28's floor plan)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules_under(*packages: str) -> list[Path]:
    return [p for package in packages for p in sorted((REPO / "cifarray" / package).rglob("*.py"))]


def test_training_models_data_and_evaluation_import_nothing_from_the_tuner():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports(p) if m.startswith("cifarray.tune"))
                 for p in modules_under("train", "models", "data", "eval")}
    assert not {k: v for k, v in offenders.items() if v}


def test_evaluation_imports_nothing_from_training():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports(p) if m.startswith("cifarray.train"))
                 for p in modules_under("eval")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_function_outside_tests_is_longer_than_60_lines_unless_its_docstring_says_why():
    long = []
    for path in sorted([*(REPO / "cifarray").rglob("*.py"), *(REPO / "hpc").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and "longer than 60 lines" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long

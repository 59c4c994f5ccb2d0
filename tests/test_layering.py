"""The package's layering, read from the source: which packages may import which (issue 28's floor plan, made whole
in issue 35: every pair of packages is checked, not two named rules)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# The floor plan, lowest first: a package may import only from the floors below its own (within itself, anything).
# The CLIs (every `__main__` module: `python -m cifarray.train`, ...) are the top floor, which nothing imports; the
# registry is the wiring under them, where the built-in families meet the name lookup that the report and the tuner
# use. `family` holds only the types a family is made of, so that the engine and the families stand above it.
FLOORS = (
    {"errors", "device", "metrics", "phases", "provenance"},
    {"config", "rundir", "runlock"},
    {"data", "models", "figures"},
    {"eval"},
    {"family"},
    {"train"},
    {"registry"},
    {"report"},
    {"tune"},
    {"bench"},
)
FLOOR = {unit: n for n, units in enumerate(FLOORS) for unit in units}
CLI = len(FLOORS)  # the floor of every __main__ module


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top, inside functions, or for type checking only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "cifarray":  # `from cifarray import registry`
                found |= {f"cifarray.{a.name}" for a in node.names}
    return found


def unit_of(module: str) -> str:
    """cifarray.train.engine -> train; cifarray.family -> family (a top-level module is a unit of its own)."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def edges() -> list[tuple[str, str]]:
    """(importing module, imported module) for every cifarray import from one unit into another."""
    found = []
    for path in sorted((REPO / "cifarray").rglob("*.py")):
        name = module_name(path)
        if name in ("cifarray.__init__", "cifarray.__main__"):
            continue
        found += [(name, target) for target in sorted(imports(path))
                  if target.startswith("cifarray.") and target.count(".") >= 1 and unit_of(target) != unit_of(name)]
    return found


def floor_of(module: str) -> int:
    return CLI if module.endswith(".__main__") else FLOOR[unit_of(module)]


def test_every_package_has_a_floor_and_imports_only_from_the_floors_below_it():
    units = {unit_of(module_name(p)) for p in (REPO / "cifarray").rglob("*.py")} - {"__init__", "__main__"}
    assert units <= set(FLOOR), f"give {sorted(units - set(FLOOR))} a floor in FLOORS"
    assert not [dst for _, dst in edges() if dst.endswith(".__main__")]  # nothing imports a CLI
    upward = [f"{src} imports {dst} (floor {floor_of(dst)}, not below {floor_of(src)})" for src, dst in edges()
              if floor_of(dst) >= floor_of(src)]
    assert not upward, upward


def test_no_two_packages_import_each_other_even_through_others():
    """The package graph (the CLIs aside) has no cycle: no unit reaches itself through the imports of others."""
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        if not src.endswith(".__main__"):
            graph.setdefault(unit_of(src), set()).add(unit_of(dst))

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cyclic = sorted(unit for unit in graph if unit in reach(unit))
    assert not cyclic, f"{cyclic} reach themselves: {graph}"


def test_the_family_types_need_nothing_above_the_run_folder():
    used = {unit_of(m) for m in imports(REPO / "cifarray" / "family.py") if m.startswith("cifarray.")}
    assert used <= FLOORS[0] | FLOORS[1], used


def test_no_function_outside_tests_is_longer_than_60_lines_unless_its_docstring_says_why():
    long = []
    for path in sorted([*(REPO / "cifarray").rglob("*.py"), *(REPO / "hpc").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and "longer than 60 lines" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_run_folders_files_are_named_by_rundir_only():
    """The run folder is the protocol between the driver, the workers, the tuner and the report: its files are read
    and written through RunDir's accessors (cifarray/rundir.py), so that no two places spell a file's name."""
    names = ("summary.json", "last_checkpoint.json", "attempts.json", "diverged.json")
    found = [f"{path.relative_to(REPO)}: {name}" for path in sorted((REPO / "cifarray").rglob("*.py"))
             if path.name != "rundir.py" for name in names if f'"{name}"' in path.read_text()]
    assert not found, found


def test_a_runs_data_is_found_loaded_and_checked_through_its_data_source_only():
    """cifarray.data.source.DataSource is the one description of a run's data (folder, procedural settings,
    verification, validation split) that train, eval, tune and bench share: no other module outside cifarray/data
    loads or writes a data set itself, or stands in for a config with a SimpleNamespace."""
    spelled = ("SimpleNamespace", "load_cifar100(", "synthetic_for_run(", "validation_split(")
    found = [f"{path.relative_to(REPO)}: {text}" for path in sorted((REPO / "cifarray").rglob("*.py"))
             if path.parent.name != "data" for text in spelled if text in path.read_text()]
    assert not found, found

"""Architecture contracts: the analysis stages stand side by side on shared foundations."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from kvpipe.stages import stages

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kvpipe"
# the analysis stage packages: every declared stage, and the summary across pairs (which reads their tables)
STAGES = (*(stage.name for stage in stages()), "pairs")


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports included), made absolute."""
    package = ".".join(("kvpipe", *path.relative_to(PACKAGE).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            out.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    return out


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "kvpipe" and parts[1] in STAGES else None


def test_the_walk_sees_absolute_relative_and_nested_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kvpipe" / "selection"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("import kvpipe.structure.cka\nfrom ..projection import fit\n"
                              "def f():\n    from kvpipe.pairs.summary import g\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "kvpipe")
    stages = {stage_of(m) for m in imported_modules(pkg / "x.py")} - {None}
    assert stages == {"structure", "projection", "pairs"}


@pytest.mark.parametrize("stage", STAGES)
def test_no_analysis_stage_imports_another(stage):
    modules = sorted((PACKAGE / stage).rglob("*.py"))
    assert modules
    crossing = {f"{path.relative_to(PACKAGE)} imports {module}" for path in modules
                for module in imported_modules(path) if stage_of(module) not in (None, stage)}
    assert not crossing, sorted(crossing)


def test_the_foundations_import_no_analysis_stage():
    """What the stages share (kv, linalg, scoring, stats, ...) stands below them: only the CLI, which runs the
    stages, imports a stage package from outside."""
    modules = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in STAGES and p.name != "cli.py"]
    crossing = {f"{path.relative_to(PACKAGE)} imports {module}" for path in modules
                for module in imported_modules(path) if stage_of(module) is not None}
    assert not crossing, sorted(crossing)


# (module, registry, schema path to its enum): every registry by name and every schema enum that names its members
REGISTRIES = [
    ("kvpipe.scoring.methods", "METHODS", ("selection", "methods", "items")),
    ("kvpipe.scoring.methods", "METHODS", ("projection", "chain", "method")),
    ("kvpipe.projection.registry", "PROJECTORS", ("projection", "projectors", "items")),
    ("kvpipe.projection.registry", "PROJECTORS", ("projection", "chain", "projector")),
    ("kvpipe.projection.registry", "PROJECTORS", ("projection", "hybrid", "projector")),
    ("kvpipe.projection.registry", "CONDITIONS", ("projection", "conditions", "items")),
    ("kvpipe.projection.layer_map", "LAYER_MAPS", ("projection", "layer_map")),
    ("kvpipe.alignment", "POOLS", ("alignment", "pool")),
]
WITHOUT_SCHEMA = {"CACHE_SOURCES"}   # registries no config names


def _enum(path: tuple[str, ...]) -> list[str]:
    from kvpipe.config import schema

    node = schema()
    for key in path:
        node = node["properties"][key] if key != "items" else node["items"]
    return node["enum"]


@cache
def _names_on_fresh_import(module: str) -> dict[str, list[str]]:
    """The names of every listed registry of a module, in a fresh interpreter that imports only that module."""
    names = sorted({r[1] for r in REGISTRIES if r[0] == module})
    code = f"import json, {module} as m; print(json.dumps({{n: sorted(getattr(m, n)) for n in {names!r}}}))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("module, registry, path", REGISTRIES, ids=[".".join(r[2]) for r in REGISTRIES])
def test_every_schema_enum_equals_its_registry_complete_on_first_import(module, registry, path):
    assert sorted(_enum(path)) == _names_on_fresh_import(module)[registry]


def test_every_registry_is_checked_against_the_schema():
    """A module-level `NAME: dict[str, ...]` filled by registration, or a names tuple a schema enum copies, is listed."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and "type[" in ast.unparse(
                    node.annotation):
                found.add(node.target.id)
    assert found - WITHOUT_SCHEMA <= {r[1] for r in REGISTRIES}, found


def test_z_comes_only_from_the_one_critical_value():
    """No module but kvpipe.stats computes a normal quantile or types 1.96."""
    pattern = re.compile(r"\bppf\(|\bisf\(|\b1\.96\b|\b1\.645\b|\b2\.576\b")
    found = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in PACKAGE.rglob("*.py") if path.name != "stats.py"
             for line in path.read_text().splitlines() if pattern.search(line)]
    assert not found, found

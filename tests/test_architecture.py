"""Architecture contracts: the analysis stages stand side by side on shared foundations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kvpipe"
STAGES = ("structure", "selection", "projection", "pairs")   # the analysis stage packages


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


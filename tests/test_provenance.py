"""Script code hashes change exactly when code the script runs changes, checked against modulefinder."""

from __future__ import annotations

import shutil
from modulefinder import ModuleFinder
from pathlib import Path

import pytest

from kvpipe.provenance import import_closure, kvpipe_imports, module_hash, module_path, script_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, list[Path]]:
    """A copy of src/kvpipe and workflow/scripts: (the copied src root, the copied scripts)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "kvpipe", src / "kvpipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "workflow" / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    scripts = sorted((tmp_path / "scripts").glob("*.py"))
    assert scripts
    return src, scripts


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def hashes(scripts: list[Path], src: Path) -> dict[str, str]:
    return {script.name: script_hash(script, src) for script in scripts}


@pytest.mark.slow
def test_hash_changes_exactly_for_scripts_that_import_the_module(tree):
    src, scripts = tree
    found = {}
    for script in scripts:
        finder = ModuleFinder(path=[str(src)])
        finder.run_script(str(script))
        found[script.name] = {name for name in finder.modules if name.split(".")[0] == "kvpipe"}
    assert all(found.values()), found
    before = hashes(scripts, src)
    changed = {}
    for path in sorted(src.rglob("*.py")):
        name = module_name(path, src)
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            after = hashes(scripts, src)
        finally:
            path.write_bytes(original)
        changed[name] = {s for s in before if after[s] != before[s]}
        assert changed[name] == {s for s, modules in found.items() if name in modules}, name
    assert hashes(scripts, src) == before
    assert changed["kvpipe.errors"] == set(before)
    assert changed["kvpipe"] == set(before)
    assert any(len(names) == 1 for names in changed.values())
    assert any(not names for names in changed.values())


def test_script_text_counts_and_unrelated_module_does_not(tree):
    src, scripts = tree
    before = hashes(scripts, src)
    assert len(set(before.values())) == len(before)
    (src / "kvpipe" / "unused_by_scripts.py").write_text("from kvpipe.errors import KvpipeError\n")
    assert hashes(scripts, src) == before
    script = scripts[0]
    script.write_text(script.read_text() + "# edited\n")
    after = hashes(scripts, src)
    assert {s for s in before if after[s] != before[s]} == {script.name}


def test_kvpipe_imports(tmp_path):
    src = tmp_path / "src"
    for rel in ("kvpipe/__init__.py", "kvpipe/x/__init__.py", "kvpipe/x/y.py", "kvpipe/x/z.py", "kvpipe/x/w.py",
                "kvpipe/p/__init__.py", "kvpipe/p/q.py", "kvpipe/p/r.py", "kvpipe/p/s/__init__.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text('"""Module."""\n')
    mod = src / "kvpipe" / "p" / "q.py"
    mod.write_text("import os\nimport kvpipe.x.y\nfrom kvpipe.x import z\nfrom kvpipe.x import name\n"
                   "from numpy import array\n\n\ndef f():\n    from kvpipe.x.w import thing\n\n\n"
                   "from . import r\nfrom .s import attr\nfrom .. import x\n")
    assert kvpipe_imports(mod, src) == {"kvpipe.x.y", "kvpipe.x.z", "kvpipe.x", "kvpipe.x.w", "kvpipe.p.r",
                                        "kvpipe.p.s"}
    init = src / "kvpipe" / "p" / "__init__.py"
    init.write_text("from . import q\nfrom .r import attr\n")
    assert kvpipe_imports(init, src) == {"kvpipe.p.q", "kvpipe.p.r"}
    assert import_closure(["kvpipe.x.y"], src) == ["kvpipe", "kvpipe.x", "kvpipe.x.y"]
    assert module_path("kvpipe.p.s", src) == src / "kvpipe" / "p" / "s" / "__init__.py"
    assert module_path("kvpipe.p.r", src) == src / "kvpipe" / "p" / "r.py"
    with pytest.raises(ModuleNotFoundError):
        module_path("kvpipe.missing", src)


def test_module_hash_defaults_to_this_checkout():
    assert module_hash("kvpipe.kv.extract") == module_hash("kvpipe.kv.extract", src=REPO / "src")
    assert script_hash(REPO / "workflow" / "scripts" / "extract_kv.py") != module_hash("kvpipe.kv.extract")

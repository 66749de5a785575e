"""Every benchmark script still imports and parses its arguments, every kvpipe name it imports (at the top or
inside a function) still exists, and the results layout the benchmarks read is the one the workflow writes."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kvpipe import layout

SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if "__main__" in p.read_text())


def test_every_bench_script_is_found():
    assert len(SCRIPTS) >= 15 and (REPO / "bench" / "run_all.py") in SCRIPTS


HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, sys.argv[1])   # as a script run from bench/ finds benchkit
seen = {}
for script in sys.argv[2:]:
    sys.argv[:] = [script, "--help"]
    out, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as end:
        code = end.code
    except BaseException:
        code = traceback.format_exc()[-2000:]
    seen[script] = {"exit": code, "stdout": out.getvalue()}
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    """Each bench script run as `python script --help`, all in one interpreter (one import of torch for all)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, str(REPO / "bench"), *map(str, SCRIPTS)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports_and_prints_its_help(script, helps):
    assert helps[str(script)]["exit"] == 0, helps[str(script)]["exit"]   # argparse exits 0 after the help
    assert helps[str(script)]["stdout"].startswith("usage: ")


def _kvpipe_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from kvpipe... import name` in a file, wherever it stands."""
    return [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvpipe"
        for alias in node.names
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_kvpipe_name_a_bench_script_imports_exists(script):
    """Function-level imports run only in a real benchmark (hours): check them here, without running it."""
    for module, name in _kvpipe_imports(script):
        assert _defines(module, name), f"{script.name}: from {module} import {name}"


def _defines(module: str, name: str) -> bool:
    """module has name (a module needing an optional dependency that is absent, such as kvpipe.kvpress without
    kvpress, is read rather than imported: a top-level def, class or assignment of name)."""
    try:
        imported = importlib.import_module(module)
        return hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}") is not None
    except ImportError:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        return any(getattr(node, "name", None) == name or
                   any(getattr(t, "id", None) == name for t in getattr(node, "targets", [])) for node in tree.body)


@pytest.mark.parametrize(
    ("path", "rule_file"),
    [
        (layout.model_dir("{model}") / "kvpipe_model.json", "models.smk"),
        (layout.samples_file("{dataset}"), "data.smk"),
        (layout.kv_dir("{dataset}", "{model}") / "manifest.json", "extract.smk"),
        (layout.stage_dir("projection", "{dataset}", "{pair}") / "answers.parquet", "projection.smk"),
        (layout.pairs_dir("{dataset}") / "summary.md", "pairs.smk"),
        (layout.log_file("extract_kv_chunk", "{dataset}", "{model}", "{chunk}"), "extract.smk"),
        (layout.benchmark_file("extract_kv_chunk", "{dataset}", "{model}", "{chunk}"), "extract.smk"),
    ],
)
def test_the_layout_is_the_one_the_rules_write(path, rule_file):
    rules = (REPO / "workflow" / "rules" / rule_file).read_text()
    assert re.search(rf'"{re.escape(path.as_posix())}"', rules), f"{path} is not an output of {rule_file}"

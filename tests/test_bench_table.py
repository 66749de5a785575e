"""The README's benchmark table is the one bench/run_all.py writes from the recorded bench/results files."""

import importlib.util
import sys

from conftest import REPO


def _run_all():
    sys.path.insert(0, str(REPO / "bench"))   # as when run as a script: benchkit beside it
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_written_from_the_recorded_results():
    run_all = _run_all()
    readme = (REPO / "README.md").read_text()
    block = readme.split(run_all.BEGIN)[1].split(run_all.END)[0]
    assert block.strip() == run_all.table().strip()
    assert (REPO / "bench" / "results" / "TABLE.md").read_text() == run_all.table()
    rows = run_all.rows()
    assert len(rows) >= 8 and all((REPO / "bench" / "results" / source).exists() for *_, source in rows)
    assert {"met", "**missed**", "", "no verdict"} >= {verdict for _, _, _, verdict, _ in rows}


def test_readme_findings_are_rendered_from_the_recorded_results():
    """Every number of 'What it has measured so far' comes from bench/findings.py reading bench/results/."""
    spec = importlib.util.spec_from_file_location("findings", REPO / "bench" / "findings.py")
    findings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(findings)
    readme = (REPO / "README.md").read_text()
    block = readme.split(findings.BEGIN)[1].split(findings.END)[0]
    assert block.strip() == findings.render().strip()
    cited = [part.split("`")[0] for part in block.split("`bench/results/")[1:]]
    assert len(cited) >= 8 and all((REPO / "bench" / "results" / path).exists() for path in cited)

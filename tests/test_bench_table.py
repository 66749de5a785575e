"""The README's benchmark table is the one bench/run_all.py writes from the recorded bench/results files."""

import importlib.util
import json
import sys

from conftest import REPO


def _bench(name: str):
    """bench/{name}.py as a module (benchkit beside it on the path, as when it runs as a script)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_written_from_the_recorded_results():
    run_all = _bench("run_all")
    readme = (REPO / "README.md").read_text()
    block = readme.split(run_all.BEGIN)[1].split(run_all.END)[0]
    assert block.strip() == run_all.table().strip()
    assert (REPO / "bench" / "results" / "TABLE.md").read_text() == run_all.table()
    rows = run_all.rows()
    assert len(rows) >= 8 and all((REPO / "bench" / "results" / source).exists() for *_, source in rows)
    assert {"met", "**missed**", "", "no verdict"} >= {verdict for _, _, _, verdict, _ in rows}


def test_readme_findings_are_rendered_from_the_recorded_results():
    """Every number of 'What it has measured so far' comes from bench/findings.py reading bench/results/."""
    findings = _bench("findings")
    readme = (REPO / "README.md").read_text()
    block = readme.split(findings.BEGIN)[1].split(findings.END)[0]
    assert block.strip() == findings.render().strip()
    cited = [part.split("`")[0] for part in block.split("`bench/results/")[1:]]
    assert len(cited) >= 8 and all((REPO / "bench" / "results" / path).exists() for path in cited)


def test_readme_test_durations_are_rendered_from_the_recorded_run():
    durations = _bench("test_durations")
    record = json.loads(durations.RECORD.read_text())
    readme = (REPO / "README.md").read_text()
    assert readme.split(durations.BEGIN)[1].split(durations.END)[0].strip() == durations.render(record).strip()
    runs = record["runs"]
    assert [] in [run["pytest_args"] for run in runs], "the whole suite's run is the table"
    for run in runs:
        assert all((REPO / path).is_file() for path in run["files"]) and run["wall_s"] > 0 and run["cpu_s"] > 0

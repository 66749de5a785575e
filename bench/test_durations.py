"""How long the test suite takes, per test file: run it, record it, and write the README's table from the record.

    python bench/test_durations.py                   # the whole suite (the README's command) -> record + README table
    python bench/test_durations.py -m "not slow"     # any pytest arguments: here the fast subset, a line of its own
    python bench/test_durations.py --render-only     # rewrite the README's table from the committed record

Runs `python -m pytest -q` with the given arguments and a JUnit XML report, and records the run in
bench/results/test_durations.json (one run per set of arguments; a new run of the same arguments replaces it):
per test file the number of tests, how many are marked `slow`, and
the seconds they took (setup, call and teardown; a session fixture's cost counts in the first test that
uses it), with the whole run's wall and CPU seconds (the CPU seconds of pytest and every process it
waited for: Snakemake and its jobs), the cores and the load average at the start (the wall time of a
run on a shared machine says little without it). The README block between the `test-durations`
markers is rendered from that record alone (tests/test_bench_table.py checks it): the table from the run of the
whole suite, and a line per recorded run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from benchkit import RECORDS, REPO, write_record

RECORD = RECORDS / "test_durations.json"
BEGIN, END = "<!-- test-durations: written by bench/test_durations.py -->", "<!-- /test-durations -->"


def _node(case: ET.Element) -> tuple[str, str]:
    """(test file, pytest node id) of a JUnit test case (classname tests.test_x[.Class], name)."""
    module, *cls = case.get("classname", "").split(".")[1:] or [""]
    path = f"tests/{module}.py"
    return path, "::".join([path, *cls, case.get("name", "")])


def _slow_ids(pytest_args: list[str]) -> set[str]:
    """Node ids of the selected tests marked `slow`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *pytest_args, "-m", "slow"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def measure(pytest_args: list[str]) -> dict:
    """Run the suite with pytest_args; the record (per file and whole run)."""
    slow, load = _slow_ids(pytest_args), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args], cwd=REPO
        )
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
        cases = ET.parse(junit).getroot().iter("testcase")
        files: dict[str, dict] = defaultdict(lambda: {"tests": 0, "slow": 0, "seconds": 0.0, "slow_seconds": 0.0})
        for case in cases:
            path, node = _node(case)
            seconds, f = float(case.get("time", 0)), files[path]
            f["tests"] += 1
            f["seconds"] += seconds
            if node in slow:
                f["slow"] += 1
                f["slow_seconds"] += seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "pytest_args": pytest_args,
        "exit_status": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cores": os.cpu_count(),
        "load_average_at_start": round(load, 2),
        "date": time.strftime("%Y-%m-%d"),
        "files": {p: {k: round(v, 1) if isinstance(v, float) else v for k, v in f.items()} for p, f in sorted(files.items())},
    }


def _line(run: dict) -> str:
    command = shlex.join(["python", "-m", "pytest", "-q", *run["pytest_args"]])
    tests = sum(f["tests"] for f in run["files"].values())
    return (f"`{command}` on {run['date']}: {tests} tests, {run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} s CPU on "
            f"{run['cores']} cores (load average {run['load_average_at_start']:g} at the start), exit status "
            f"{run['exit_status']}.")


def render(record: dict) -> str:
    """The README's table (the run of the whole suite) and a line per recorded run."""
    whole = next((run for run in record["runs"] if not run["pytest_args"]), record["runs"][0])
    lines = ["| test file | tests | of them `slow` | seconds | of them `slow` |", "|---|---|---|---|---|"]
    lines += [
        f"| `{p}` | {f['tests']} | {f['slow']} | {f['seconds']:.0f} | {f['slow_seconds']:.0f} |"
        for p, f in whole["files"].items()
    ]
    total = {k: sum(f[k] for f in whole["files"].values()) for k in ("tests", "slow", "seconds", "slow_seconds")}
    lines.append(f"| all | {total['tests']} | {total['slow']} | {total['seconds']:.0f} | {total['slow_seconds']:.0f} |")
    lines += ["", *(f"- {_line(run)}" for run in record["runs"])]
    return "\n".join(lines) + "\n"


def write_readme(record: dict, readme: Path = REPO / "README.md") -> None:
    """The README block between the markers, from the record."""
    head, rest = readme.read_text().split(BEGIN)
    readme.write_text(f"{head}{BEGIN}\n{render(record)}{END}{rest.split(END, 1)[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render-only", action="store_true", help="rewrite the README's table from the committed record")
    args, pytest_args = ap.parse_known_args()
    if not args.render_only:
        runs = json.loads(RECORD.read_text()).get("runs", []) if RECORD.exists() else []
        run = measure(pytest_args)
        write_record(RECORD, {"runs": [r for r in runs if r["pytest_args"] != pytest_args] + [run]})
    write_readme(json.loads(RECORD.read_text()))
    print(render(json.loads(RECORD.read_text())))


if __name__ == "__main__":
    main()

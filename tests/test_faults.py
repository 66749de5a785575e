"""Faults and determinism on the smoke workflow: SIGKILL mid-stage, then resume; two runs, one result.

Each case works on a copy of the completed smoke run. A kill case removes one compute stage's
outputs and what depends on them (as before that stage's first run), runs the workflow and
SIGKILLs the whole run, Snakemake and job, once that stage's progress bar reaches a count
(tests/faults/sitecustomize.py): nothing it leaves may pass for complete (the stage's output
is absent and, once the dead run's lock is released with --unlock, a dry run plans the stage
again), and rerunning finishes the work with every result
file byte-identical to the uninterrupted run's. Measured seconds (logs, Snakemake benchmarks and
each stage's timing files) are the only files allowed to differ.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, missing_slurm_prerequisite, planned_jobs, snakemake, snakemake_command

from kvpipe.projection.stage import FIT_TIMINGS
from kvpipe.stages import stages

pytestmark = pytest.mark.slow   # Snakemake runs, killed and rerun

HOOK = REPO / "tests" / "faults"
TIMED = {*(name for s in stages() for name in s.timing), FIT_TIMINGS, "ttft_aggregates.parquet", "timing.md",
         "timing.html"}
UNTIMED_DIRS = ("results/logs/", "results/benchmarks/")


def result_digests(repo: Path) -> dict[str, str]:
    """SHA-256 of every result file but the measured seconds."""
    return {path.relative_to(repo).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((repo / "results").rglob("*")) if path.is_file()
            and not path.relative_to(repo).as_posix().startswith(UNTIMED_DIRS) and path.name not in TIMED}


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def run(smoke_repo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the completed smoke run and its result digests."""
    copy = tmp_path_factory.mktemp("faults") / "repo"
    shutil.copytree(smoke_repo, copy, symlinks=True)
    return copy, result_digests(copy)


def test_two_runs_of_one_config_give_byte_identical_results(run):
    """A second run of the smoke config, here in the same checkout. Where the SLURM test cluster runs, that second run
    is tests/test_slurm.py's (a fresh checkout, every job through SLURM, every result file compared with the smoke
    run's in the same way): the suite then runs the smoke workflow twice, not three times."""
    if missing_slurm_prerequisite() is None:
        pytest.skip("the second run is test_slurm.py's: test_every_job_runs_on_slurm_and_the_results_equal_the_local_run")
    repo, expected = run
    assert any(k.endswith("answers.parquet") for k in expected) and any(k.endswith(".pdf") for k in expected)
    proc = snakemake(repo, "--forceall")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences(result_digests(repo), expected) == []


PAIR = "synthetic-small/tiny"
STAGE_DIRS = {stage: f"results/{stage}/{PAIR}" for stage in ("structure", "selection", "projection")}
PAIRS_SUMMARY = "results/pairs/synthetic-small"


@pytest.mark.parametrize(("rule", "bar", "count", "output", "removed"), [
    # extraction: its manifest goes (the shards stay, as after a first run killed midway), and everything after it
    ("extract_kv_chunk", "extract tiny-main", 5, "results/kv/synthetic-small/tiny-main/chunks/0000/manifest.json",
     ["results/kv/synthetic-small/tiny-main/manifest.json", *STAGE_DIRS.values(), PAIRS_SUMMARY]),
    ("structure", "structure tiny", 1, f"{STAGE_DIRS['structure']}/metrics.parquet",
     [STAGE_DIRS["structure"], PAIRS_SUMMARY]),
    ("selection_chunk", "selection tiny", 2, f"{STAGE_DIRS['selection']}/chunks/0000/answers.parquet",
     [STAGE_DIRS["selection"], PAIRS_SUMMARY]),
    ("projection_chunk", "projection tiny: answers", 1, f"{STAGE_DIRS['projection']}/chunks/0000/answers.parquet",
     [STAGE_DIRS["projection"]]),
])
def test_sigkill_mid_stage_leaves_nothing_complete_and_the_rerun_gives_the_same_results(run, rule, bar, count, output,
                                                                                         removed):
    repo, expected = run
    for rel in [output, *removed]:   # as before the stage's first run: it and what depends on it are not there yet
        path = repo / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = os.environ | {"KVPIPE_KILL_AT": f"{bar}:{count}",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run(snakemake_command(repo), env=env, start_new_session=True, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]   # killed mid-stage, not finished
    assert not (repo / output).exists()
    assert snakemake(repo, "--unlock").returncode == 0   # the killed Snakemake could not release its lock
    assert planned_jobs(snakemake(repo, "-n", "--rerun-incomplete")).get(rule, 0) >= 1
    rerun = snakemake(repo, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert differences(result_digests(repo), expected) == []

"""The smoke workflow on a real single-node SLURM cluster, through profiles/slurm and the executor plugin.

profiles/slurm/testcluster.sh starts munged, slurmctld and slurmd (Debian's slurm-wlm and munge packages, as root)
for the session and stops exactly those daemons at its end. The cluster tests (marked `slurm`) are skipped, with the
reason, where SLURM, munge or the executor plugin is not installed, the user is not root, /etc/slurm/slurm.conf
belongs to another cluster, or KVPIPE_SLURM_TESTS=0; a cluster that does not start there fails them. The profile is
used as shipped, its partition placeholders filled as a site would (`cpu` and `gpu`, both holding this machine); the
command line adds only what a one-node, two-CPU test cluster needs: `--cores 2`, polling with squeue (no slurmdbd,
so no sacct) soon after submission, and kept SLURM logs.

- Every job of the smoke run but the localrules goes through SLURM (a SLURM job id in Snakemake's log, COMPLETED in
  squeue, on the partition the profile names) and every result file equals the local run's byte for byte.
- A selection job cancelled with scancel mid-stage is resubmitted by Snakemake's retry with twice the memory, and
  the results are again the local run's.
- `run.materialize_on_submit_host` materialises a model on the submit host, without a SLURM job.
- The script's own contract: start is idempotent; stop ends exactly the daemons it recorded (the latter without SLURM).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import REPO, copy_checkout, fill_slurm_placeholders, missing_slurm_prerequisite, snakemake_command
from test_faults import PAIRS_SUMMARY, STAGE_DIRS, differences, result_digests

SCRIPT = REPO / "profiles" / "slurm" / "testcluster.sh"
HOOK = REPO / "tests" / "slurm"
# the profile sends them to the GPU partition: one job per chunk of samples, and the projector fit
GPU_RULES = {"extract_kv_chunk", "selection_chunk", "projection_fit", "projection_chunk"}
LOCAL_RULES = {"structure_report", "selection_report", "projection_report", "pairs_summary", "all",
               "sample_dataset", "extract_kv", "selection", "projection"}   # the reports and the chunks' gathers
CLUSTER_ARGS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--slurm-keep-successful-logs",
    "--latency-wait",
    "5",
)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Environment of a running test cluster (SLURM_CONF set); skips, saying why, where it cannot run."""
    reason = missing_slurm_prerequisite()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="kvpipe-slurm-test-", dir="/tmp"))  # munged must reach it: not under pytest's
    env = os.environ | {"KVPIPE_SLURM_DIR": str(state), "KVPIPE_SLURM_PORT": os.environ.get("KVPIPE_SLURM_TEST_PORT", "6837")}
    try:
        start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, f"the SLURM test cluster did not start: {start.stdout}{start.stderr}"
        yield env | {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)


def cluster_env(cluster: dict[str, str], **extra: str) -> dict[str, str]:
    """The run's environment: the cluster's, this Python first on PATH (jobs inherit it: --export=ALL)."""
    env = {k: v for k, v in cluster.items() if k not in ("SNAKEMAKE_PROFILE", "KVPIPE_KILL_AT")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | extra


def run_on_slurm(
    repo: Path, cluster: dict[str, str], *args: str, overlays: tuple[Path, ...] = (), **env: str
) -> subprocess.CompletedProcess:
    """snakemake --profile <the repo's filled profiles/slurm> on the smoke config, in the repo."""
    profile = fill_slurm_placeholders(repo / "profiles" / "slurm")
    cmd = snakemake_command(repo, "--profile", str(profile), *CLUSTER_ARGS, *args, overlays=overlays)
    return subprocess.run(cmd, cwd=repo, env=cluster_env(cluster, **env), capture_output=True, text=True, timeout=1800)


def slurm_jobs(log: str) -> dict[str, list[tuple[str, str]]]:
    """Rule -> [(wildcards, SLURM job id), ...] in submission order, from Snakemake's log."""
    rules = {}
    for block in re.finditer(r"^(?:local)?rule (\w+):\n((?: {4}.*\n)+)", log, re.M):
        jobid = re.search(r"^ {4}jobid: (\d+)$", block[2], re.M)
        wildcards = re.search(r"^ {4}wildcards: (.*)$", block[2], re.M)
        if jobid:
            rules[jobid[1]] = (block[1], wildcards[1] if wildcards else "")
    jobs: dict[str, list[tuple[str, str]]] = {}
    for jobid, slurm_id in re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+) ", log, re.M):
        rule, wildcards = rules[jobid]
        jobs.setdefault(rule, []).append((wildcards, slurm_id))
    return jobs


def squeue(cluster: dict[str, str], ids: list[str]) -> dict[str, dict[str, str]]:
    """SLURM's record of jobs (kept MinJobAge after they end): state, partition, memory, comment."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%P|%m|%k"],
        env=cluster,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = ("state", "partition", "memory", "comment")
    return {line.split("|")[0]: dict(zip(fields, line.split("|")[1:])) for line in out.splitlines()}


@pytest.fixture(scope="module")
def local_digests(smoke_repo) -> dict[str, str]:
    """The local smoke run's result files (conftest's smoke_repo) and their SHA-256."""
    return result_digests(smoke_repo)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the checkout on which the smoke workflow ran through the test cluster."""
    repo = copy_checkout(tmp_path_factory.mktemp("slurm") / "repo")
    proc = run_on_slurm(repo, slurm_cluster)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return repo, proc


@pytest.mark.slurm
@pytest.mark.slow
def test_every_job_runs_on_slurm_and_the_results_equal_the_local_run(slurm_run, slurm_cluster, local_digests):
    repo, proc = slurm_run
    log = proc.stdout + proc.stderr
    jobs = slurm_jobs(log)
    planned = {m[1] for m in re.finditer(r"^rule (\w+):$", log, re.M)}
    assert planned == {"materialize_model", "sample_chunk", "structure"} | GPU_RULES
    assert set(re.findall(r"^localrule (\w+):$", log, re.M)) == LOCAL_RULES  # run on the submit host, as declared
    assert set(jobs) == planned and [len(jobs[r]) for r in ("materialize_model", "extract_kv_chunk")] == [2, 2]
    assert all(len(jobs[r]) == 1 for r in planned - {"materialize_model", "extract_kv_chunk"}), jobs  # no retry needed
    records = squeue(slurm_cluster, [slurm_id for submitted in jobs.values() for _, slurm_id in submitted])
    for rule, submitted in jobs.items():
        for _, slurm_id in submitted:
            record = records[slurm_id]
            assert record["state"] == "COMPLETED" and record["comment"].startswith(f"rule_{rule}"), record
            assert record["partition"] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, record)
            assert list((repo / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{slurm_id}.log")), slurm_id
    assert differences(result_digests(repo), local_digests) == []


@pytest.fixture
def slurm_copy(slurm_run, tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(slurm_run[0], repo, symlinks=True)
    return repo


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_cancelled_mid_stage_is_resubmitted_with_more_memory_and_gives_the_same_results(
    slurm_copy, slurm_cluster, local_digests
):
    repo = slurm_copy
    for rel in (STAGE_DIRS["selection"], PAIRS_SUMMARY):  # as before the selection stage's first run
        shutil.rmtree(repo / rel)
    mark = repo / "cancelled-job"
    pythonpath = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
    proc = run_on_slurm(
        repo, slurm_cluster, PYTHONPATH=pythonpath, KVPIPE_SCANCEL_AT="selection tiny:2", KVPIPE_SCANCEL_MARK=str(mark)
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    (first, cancelled), (second, resubmitted) = slurm_jobs(log)["selection_chunk"]  # one job, submitted twice
    assert first == second and mark.read_text() == cancelled != resubmitted  # the first one cancelled itself
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in log
    records = squeue(slurm_cluster, [cancelled, resubmitted])
    assert (records[cancelled]["state"], records[resubmitted]["state"]) == ("CANCELLED", "COMPLETED")
    assert (records[cancelled]["memory"], records[resubmitted]["memory"]) == ("2000M", "4000M")  # mem_mb × attempt
    assert differences(result_digests(repo), local_digests) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_models_can_be_materialised_on_the_submit_host(slurm_copy, slurm_cluster, local_digests, tmp_path):
    repo = slurm_copy
    card = "results/models/tiny-scout/kvpipe_model.json"
    shutil.rmtree(repo / "results" / "models" / "tiny-scout")
    on_submit_host = tmp_path / "submit-host.yaml"
    on_submit_host.write_text("run: {materialize_on_submit_host: true}\n")
    proc = run_on_slurm(repo, slurm_cluster, card, overlays=(on_submit_host,))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert re.search(r"^localrule materialize_model:$", log, re.M) and not slurm_jobs(log)  # no SLURM job
    assert {k: v for k, v in result_digests(repo).items() if k.startswith("results/models/tiny-scout/")} == {
        k: v for k, v in local_digests.items() if k.startswith("results/models/tiny-scout/")
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_start_again_starts_nothing(slurm_cluster):
    """start is idempotent: on a running cluster it starts no daemon and records the same pids."""

    def daemons() -> tuple[str, set[str]]:
        status = subprocess.run([str(SCRIPT), "status"], env=slurm_cluster, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr  # all three run
        # every process started with a path of this cluster's directory: munged, slurmctld, slurmd (not slurmscriptd)
        found = subprocess.run(["pgrep", "-f", slurm_cluster["KVPIPE_SLURM_DIR"]], capture_output=True, text=True)
        return status.stdout, set(found.stdout.split())

    before, pids = daemons()
    again = subprocess.run([str(SCRIPT), "start"], env=slurm_cluster, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert daemons() == (before, pids) and len(pids) == 3 and set(re.findall(r"pid (\d+)", before)) == pids


def spawn(program: Path) -> subprocess.Popen:
    """A process of `program` sleeping 5 minutes, reaped as soon as it ends (no zombie keeps its /proc entry)."""
    proc = subprocess.Popen([str(program), "300"])
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


@pytest.mark.skipif(shutil.which("sleep") is None, reason="needs sleep(1)")
def test_stop_ends_exactly_the_recorded_daemons(tmp_path):
    """stop ends each process its pid files name while that process is still the daemon, and no other: neither a
    process of the same name it did not record, nor a recorded pid another program holds now. No SLURM needed:
    copies of sleep named like the daemons stand in for them."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name in ("slurmctld", "slurmd"):
        shutil.copy(shutil.which("sleep"), fakes / name)  # /proc/<pid>/comm is the program's file name
    state = tmp_path / "cluster"
    (state / "munge").mkdir(parents=True)
    recorded = {name: spawn(fakes / name) for name in ("slurmctld", "slurmd")}
    others = [spawn(fakes / "slurmd"), spawn(Path(shutil.which("sleep")))]  # a namesake; a reused pid (below)
    try:
        for name, proc in recorded.items():
            (state / f"{name}.pid").write_text(f"{proc.pid}\n")
        (state / "munge" / "munged.pid").write_text(f"{others[1].pid}\n")  # munged is gone, its pid reused by sleep
        stop = subprocess.run(
            [str(SCRIPT), "stop"], env=os.environ | {"KVPIPE_SLURM_DIR": str(state)}, capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.splitlines() == [f"{name}: stopped (pid {recorded[name].pid})" for name in ("slurmd", "slurmctld")]
        assert [proc.wait(timeout=10) for proc in recorded.values()] == [-15, -15]  # SIGTERM
        assert [proc.poll() for proc in others] == [None, None]  # still running
        assert not any(state.glob("slurm*.pid"))
    finally:
        for proc in [*recorded.values(), *others]:
            proc.kill()


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run's command is the README's test command."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"Run the tests .*?```bash\n(.*?)\n```", readme, re.S)[1]
    assert (REPO / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command
    assert command.endswith("python -m pytest -q")

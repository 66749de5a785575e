"""Scheduling: what each job asks a workstation or SLURM for (GPUs, memory, runtime, threads, partition).

The workflow tests here are dry runs of a copy of the checkout (seconds), plus one tiny real job
that checks the thread count torch runs with.
"""

import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_checkout, fill_slurm_placeholders, snakemake
from test_workflow import overlay

from kvpipe.config import deep_merge, load_config, schema, validate
from kvpipe.errors import KvpipeError
from kvpipe.scheduling import job_resources, model_resources, model_size_b, on_attempt, size_in_name, uses_cuda
from kvpipe.workflow import claim_gpus

# rules that run a model on the device: one job per chunk of samples, and the projector fit
MODEL_RULES = {"extract_kv_chunk", "selection_chunk", "projection_fit", "projection_chunk"}
THREADED_RULES = {"materialize_model", "structure"} | MODEL_RULES
OVERLAY_3B_7B = REPO / "config" / "qwen2.5-3b-7b.yaml"
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "all_proxy": "http://127.0.0.1:9",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1"}


def dry_run_jobs(stdout: str) -> list[dict]:
    """Each job of a dry run's listing: rule, wildcards, threads and resources (name -> value as printed)."""
    jobs = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", stdout, flags=re.M):
        head = re.match(r"(?:local)?rule (\w+):$", block, re.M)
        if head is None:
            continue
        fields = dict(re.findall(r"^ {4}(\w+): (.*)$", block, re.M))
        jobs.append({"rule": head[1], "wildcards": dict(re.findall(r"(\w+)=([^,\s]+)", fields.get("wildcards", ""))),
                     "threads": int(fields.get("threads", 1)),
                     "resources": dict(re.findall(r"(\w+)=([^,]*)", fields.get("resources", "")))})
    return jobs


def job(jobs: list[dict], rule: str, **wildcards: str) -> dict:
    (found,) = [j for j in jobs if j["rule"] == rule and all(j["wildcards"].get(k) == v for k, v in wildcards.items())]
    return found


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout, with no results: dry runs plan every job."""
    return copy_checkout(tmp_path_factory.mktemp("checkout"))


def cluster_dry_run(checkout: Path, *configfiles: Path) -> subprocess.CompletedProcess:
    """`snakemake -n --profile profiles/slurm --configfile ...` in the checkout, with the network unreachable,
    its partition placeholders filled with `cpu` and `gpu` as a site would."""
    fill_slurm_placeholders(checkout / "profiles" / "slurm")
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKEMAKE_PROFILE", "NO_PROXY", "no_proxy")} | OFFLINE
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm", "--configfile", *map(str, configfiles)]
    return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)


# --- sizes, memory and runtime ---------------------------------------------------------------

@pytest.mark.parametrize("name, size", [
    ("Qwen/Qwen2.5-7B-Instruct", 7.0), ("qwen2.5-coder-0.5b", 0.5), ("SmolLM2-135M-Instruct.Q4_1.gguf", 0.135),
    ("Llama-3.1-8B", 8.0), ("Mixtral-8x7B", None), ("tiny-main", None), ("gpt2", None), ("Qwen2.5", None),
])
def test_a_model_size_is_read_from_its_name(name, size):
    assert size_in_name(name) == (pytest.approx(size) if size is not None else None)


def _config(text: str) -> dict:
    return validate(deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), yaml.safe_load(text)))


def test_memory_and_runtime_scale_with_the_model_size_and_explicit_values_win():
    config = _config("""
models:
  hub-7b: {source: hf, id: Qwen/Qwen2.5-7B-Instruct}
  mystery: {source: tiny, arch: qwen2}
  sized: {source: tiny, arch: qwen2}
resources:
  default: {mem_mb: 3000, runtime: 40}
  scale: {mem_mb: {base: 1000, per_b: 2000}, runtime: {base: 10, per_b: 5}}
  models:
    sized: {params_b: 2.5}
    hub-7b: {runtime: 99}
""")
    assert model_size_b(config, "hub-7b") == 7.0 and model_size_b(config, "mystery") is None
    assert model_resources(config, "hub-7b") == {"mem_mb": 15000, "runtime": 99}   # size from the hub id; runtime explicit
    assert model_resources(config, "mystery") == {"mem_mb": 3000, "runtime": 40}   # unknown size: the default
    assert model_resources(config, "sized") == {"mem_mb": 6000, "runtime": 22}     # explicit params_b
    assert job_resources(config, ["sized", "hub-7b"]) == {"mem_mb": 21000, "runtime": 121}  # a pair: both models


def test_a_retried_job_asks_for_more_memory_and_the_same_runtime():
    config = _config("""
models:
  hub-7b: {source: hf, id: Qwen/Qwen2.5-7B-Instruct}
  mystery: {source: tiny, arch: qwen2}
resources:
  default: {mem_mb: 3000, runtime: 40}
  scale: {mem_mb: {base: 1000, per_b: 2000}, runtime: {base: 10, per_b: 5}}
""")
    first = job_resources(config, ["mystery", "hub-7b"])
    assert first == job_resources(config, ["mystery", "hub-7b"], attempt=1) == {"mem_mb": 18000, "runtime": 85}
    for attempt in (2, 3):   # Snakemake's attempt on the first and second retry
        assert job_resources(config, ["mystery", "hub-7b"], attempt) == {"mem_mb": 18000 * attempt, "runtime": 85}
    assert [on_attempt(8000, a) for a in (1, 2, 3)] == [8000, 16000, 24000]
    with pytest.raises(ValueError, match="from 1"):
        on_attempt(8000, 0)
    # every rule with a memory budget declares it through a function of the attempt
    rules = "".join(path.read_text() for path in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    declared = re.findall(r"^ +mem_mb=(.*),$", rules, re.M)
    assert declared and all(re.match(r"(job_resource\(\"mem_mb\"|retry_mem_mb\()", d) for d in declared), declared
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "return job_resources(config, models(wc), attempt, samples)[key]" in common
    assert "lambda wc, attempt: on_attempt(mem_mb, attempt)" in common


def test_a_chunk_job_asks_for_runtime_in_proportion_to_its_samples():
    config = _config("""
models:
  hub-7b: {source: hf, id: Qwen/Qwen2.5-7B-Instruct}
resources:
  scale: {mem_mb: {base: 1000, per_b: 2000}, runtime: {base: 10, per_b: 5}}
  runtime_samples: 16
""")
    own = job_resources(config, ["hub-7b"])
    assert own == {"mem_mb": 15000, "runtime": 45}
    assert job_resources(config, ["hub-7b"], samples=16) == own == job_resources(config, ["hub-7b"], samples=4)
    assert job_resources(config, ["hub-7b"], samples=64) == {"mem_mb": 15000, "runtime": 180}   # 4 x the samples
    assert job_resources(config, ["hub-7b"], 2, samples=20) == {"mem_mb": 30000, "runtime": 57}  # ceil(45 x 1.25)
    # the three chunk rules pass their chunk's samples; no other rule does
    rules = "".join(path.read_text() for path in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    chunked = re.findall(r"^rule (\w+):\n(?:(?:    .*)?\n)*?        runtime=job_resource\(.*chunked=True\),$", rules, re.M)
    assert sorted(chunked) == ["extract_kv_chunk", "projection_chunk", "selection_chunk"]


def test_the_gpu_follows_the_configured_device(monkeypatch):
    import torch

    assert uses_cuda("cuda") and not uses_cuda("cpu")
    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert uses_cuda("auto") is available


def _rules_declaring(pattern: str) -> set[str]:
    """Rules of workflow/rules/*.smk whose body matches pattern."""
    text = "".join(path.read_text() for path in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    return {m[1] for m in re.finditer(r"^rule (\w+):\n((?:[ #].*\n|\n)*)", text, re.M) if re.search(pattern, m[2])}


def test_threads_can_be_set_for_every_rule_that_runs_torch_and_no_other():
    names = schema()["properties"]["resources"]["properties"]["threads"]["propertyNames"]["enum"]
    assert set(names) == _rules_declaring(r"threads: rule_threads\(") == THREADED_RULES
    with pytest.raises(KvpipeError, match="resources.threads"):
        _config("resources: {threads: {selection_report: 2}}")


def test_the_slurm_profile_leaves_partitions_and_account_to_the_site(tmp_path):
    shipped = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert not {"slurm_partition", "slurm_account"} & set(shipped["default-resources"])   # placeholders only
    assert not any("slurm_partition" in res for res in shipped["set-resources"].values())
    assert shipped["retries"] >= 1   # a job killed for its memory is resubmitted with more (kvpipe.scheduling.on_attempt)


def test_every_gpu_rule_goes_to_the_gpu_partition_on_slurm(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "config.yaml").write_text((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile = yaml.safe_load((fill_slurm_placeholders(tmp_path / "slurm") / "config.yaml").read_text())
    assert profile["default-resources"]["slurm_partition"] == "cpu" and "slurm_account" not in profile["default-resources"]
    gpu_rules = _rules_declaring(r"gpu=MODEL_GPUS")
    assert gpu_rules == MODEL_RULES
    for rule in gpu_rules:
        assert profile["set-resources"][rule]["slurm_partition"] != profile["default-resources"]["slurm_partition"]
        assert profile["set-resources"][rule]["cpus_per_gpu"] == "threads"
        assert "gpu" not in profile["set-resources"][rule]   # the workflow asks for it, only on CUDA


# --- GPU slots on a workstation ----------------------------------------------------------------

def test_concurrent_gpu_jobs_get_different_gpus_and_never_more_than_the_machine_has(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with ExitStack() as first, ExitStack() as second:
        assert claim_gpus(1, first, tmp_path) == ["3"]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")    # the next job starts from the same environment
        assert claim_gpus(1, second, tmp_path) == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
        with ExitStack() as third, pytest.raises(KvpipeError, match="no free GPU"):
            claim_gpus(1, third, tmp_path)
    with ExitStack() as again:                               # the jobs ended: their GPUs are free again
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
        assert claim_gpus(1, again, tmp_path) == ["3"]


def test_without_cuda_visible_devices_the_slots_are_the_machines_gpus(tmp_path, monkeypatch):
    gpus = tmp_path / "gpus"
    for address in ("0000:17:00.0", "0000:65:00.0"):
        (gpus / address).mkdir(parents=True)
    monkeypatch.setattr("kvpipe.workflow.NVIDIA_GPUS", gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with ExitStack() as stack:
        assert claim_gpus(2, stack, tmp_path / "locks") == ["0", "1"]
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        with pytest.raises(KvpipeError, match="all 2 GPUs"):
            claim_gpus(1, stack, tmp_path / "locks")


def test_a_job_given_exactly_its_gpus_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")       # SLURM's allocation of --gpus=1
    with ExitStack() as stack:
        assert claim_gpus(1, stack, tmp_path) == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "7"
        assert claim_gpus(0, stack, tmp_path) == []
    assert not list(tmp_path.iterdir())


# --- the workflow's declarations (dry runs) ------------------------------------------------------

@pytest.mark.slow
def test_model_jobs_declare_a_gpu_only_on_cuda_and_threads_from_the_run(checkout, tmp_path):
    cuda = overlay(tmp_path, "device: cuda\nresources: {threads: {selection_chunk: 1}}\n")
    for extra, gpu in (((), "0"), ((cuda,), "1")):
        proc = snakemake(checkout, "-n", "--cores", "3", "--resources", "gpu=1", overlays=extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        jobs = dry_run_jobs(proc.stdout)
        assert {j["rule"] for j in jobs} >= THREADED_RULES | {"sample_dataset", "structure_report"}
        for j in jobs:
            assert j["resources"].get("gpu", "0") == (gpu if j["rule"] in MODEL_RULES else "0"), j
            threaded = j["rule"] in THREADED_RULES and not (extra and j["rule"] == "selection_chunk")
            assert j["threads"] == (3 if threaded else 1), j   # --cores 2 in snakemake() is overridden by --cores 3


def test_report_rules_are_local():
    declared = set()
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        for block in re.findall(r"^localrules:\n((?:    \w+,\n)+)", path.read_text(), re.M):
            declared |= set(re.findall(r"\w+", block))
    rules = set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
                           re.M))
    reports = {r for r in rules if r.endswith("_report")}
    assert reports and reports <= declared and not declared & (MODEL_RULES | THREADED_RULES)


def test_the_workstation_profile_is_not_loaded_into_cluster_runs():
    assert not (REPO / "profiles" / "default").exists()   # Snakemake would load it into every run
    local = yaml.safe_load((REPO / "profiles" / "local" / "config.yaml").read_text())
    assert local["resources"]["gpu"] == 1 and "executor" not in local


@pytest.mark.slow
def test_the_3b_7b_pair_on_slurm_builds_offline_with_each_jobs_resources(checkout):
    proc = cluster_dry_run(checkout, checkout / OVERLAY_3B_7B.relative_to(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "profiles/slurm" in proc.stdout + proc.stderr
    assert "workflow specific profile" not in proc.stdout + proc.stderr
    jobs = dry_run_jobs(proc.stdout)
    assert sorted(j["rule"] for j in jobs) == sorted(
        ["materialize_model"] * 2 + ["sample_chunk"] * 2 + ["extract_kv_chunk"] * 4 + ["extract_kv"] * 2
        + ["selection_chunk"] * 2 + ["projection_chunk"] * 2   # n = 20 in chunks of 16
        + ["sample_dataset", "structure", "selection", "projection_fit", "projection", "structure_report",
           "selection_report", "projection_report", "pairs_summary", "all"])
    config = load_config([REPO / "config.yaml", OVERLAY_3B_7B])
    profile = yaml.safe_load((checkout / "profiles" / "slurm" / "config.yaml").read_text())
    cores = profile["cores"]
    for j in jobs:
        res, rule = j["resources"], j["rule"]
        if rule in ("materialize_model", "extract_kv_chunk"):
            expected = job_resources(config, [j["wildcards"]["model"]])
        elif rule in ("selection_chunk", "projection_fit", "projection_chunk"):
            expected = job_resources(config, ["qwen2.5-3b", "qwen2.5-7b"])
        else:
            expected = None
        if expected is not None:   # every job that loads a model: memory and runtime from the models' sizes
            assert (int(res["mem_mb"]), int(res["runtime"])) == (expected["mem_mb"], expected["runtime"]), j
            assert j["threads"] == cores, j
        if rule in MODEL_RULES:    # GPU rules: one GPU on the GPU partition, a CPU per thread
            assert (res["gpu"], res["slurm_partition"], res["cpus_per_gpu"]) == ("1", "gpu", str(cores)), j
        else:
            assert res.get("gpu", "0") == "0" and res.get("slurm_partition") == "cpu", j
    # the sizes themselves: 2000 + 5000 MB and 30 + 30 minutes per billion parameters (3.09B, 7.62B)
    assert job(jobs, "extract_kv_chunk", model="qwen2.5-7b", chunk="0001")["resources"]["mem_mb"] == "40100"
    assert job(jobs, "extract_kv_chunk", model="qwen2.5-3b", chunk="0000")["resources"]["runtime"] == "123"
    pair = job(jobs, "selection_chunk", chunk="0000")["resources"]
    assert (pair["mem_mb"], pair["runtime"]) == ("57550", "382")   # not capped by a workstation's 20 GB


# --- the thread count a model job runs with ------------------------------------------------------

@pytest.mark.slow
def test_model_jobs_run_torch_with_the_jobs_threads(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    threads = overlay(tmp_path, "resources: {threads: {extract_kv_chunk: 1}}\n")
    proc = snakemake(checkout, "results/kv/synthetic-small/tiny-scout/manifest.json", overlays=(threads,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = checkout / "results" / "logs"
    assert "torch threads: 2\n" in (logs / "materialize_model" / "tiny-scout.log").read_text()     # --cores 2
    assert "torch threads: 1\n" in (logs / "extract_kv_chunk" / "synthetic-small" / "tiny-scout" / "0000.log").read_text()
    assert "torch threads: 1\n" in (logs / "sample_dataset" / "synthetic-small.log").read_text()

"""End-to-end: the Snakemake DAG on the smoke config (tiny models, seconds)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, SMOKE

from kvpipe.kv import store as kvstore


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(SMOKE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table (empty when nothing is to be done)."""
    stats = proc.stdout.split("Job stats:")[1] if "Job stats:" in proc.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smk")
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_smoke_workflow_builds_every_target(workdir):
    for stage, figures in (("structure", ("transfer_heatmap", "cka_matrices", "cosine_r2_baseline")),
                           ("selection", ("f1_vs_retention", "overlap"))):
        out = workdir / "results" / stage / "synthetic-small" / "tiny"
        assert (out / "summary.md").read_text().startswith("# ")
        for name in figures:
            assert (out / "figures" / f"{name}.png").stat().st_size > 1000
            assert (out / "figures" / f"{name}.pdf").exists()
    answers = pd.read_parquet(workdir / "results/selection/synthetic-small/tiny/answers.parquet")
    assert set(answers["method"]) == {"full", "q2c", "snapkv", "random"} and answers["sample_idx"].nunique() == 6
    samples = pd.read_parquet(workdir / "results/data/synthetic-small/samples.parquet")
    assert len(samples) == 6 and list(samples.columns)[:7] == ["sample_idx", "id", "title", "context", "question",
                                                                 "answers", "is_impossible"]
    for model, layers in (("tiny-scout", 2), ("tiny-main", 3)):
        root = workdir / "results/kv/synthetic-small" / model
        manifest = kvstore.load_manifest(root)
        assert manifest["model"] == model and manifest["layers"] == list(range(layers))
        assert manifest["n_samples"] == 6
        assert kvstore.read_layer(root, layers - 1).num_rows == manifest["rows_per_layer"]
        assert (workdir / f"results/logs/extract_kv/synthetic-small/{model}.log").exists()
        assert (workdir / f"results/benchmarks/extract_kv/synthetic-small/{model}.tsv").exists()
    card = json.loads((workdir / "results/models/tiny-main/kvpipe_model.json").read_text())
    assert card["slug"] == "tiny-main"


def test_rerun_does_nothing_and_one_model_change_reruns_only_its_jobs(workdir, tmp_path):
    assert planned_jobs(snakemake(workdir, "-n")) == {}
    change = tmp_path / "change.yaml"
    change.write_text("models:\n  tiny-main: {seed: 9}\n")
    plan = planned_jobs(snakemake(workdir, "-n", "--configfile", str(SMOKE), str(change)))
    # that model, its KV, and the analyses of the one pair that uses it; the dataset is not resampled
    assert plan == {"materialize_model": 1, "extract_kv": 1, "structure": 1, "selection": 1, "all": 1}
    resources = tmp_path / "resources.yaml"
    resources.write_text("resources:\n  models:\n    tiny-main: {mem_mb: 1200}\n")
    assert planned_jobs(snakemake(workdir, "-n", "--configfile", str(SMOKE), str(resources))) == {}


def test_extraction_setting_reruns_extraction_only(workdir, tmp_path):
    change = tmp_path / "change.yaml"
    change.write_text("extraction: {storage_dtype: float16}\n")
    plan = planned_jobs(snakemake(workdir, "-n", "--configfile", str(SMOKE), str(change)))
    assert plan == {"extract_kv": 2, "structure": 1, "all": 1}  # selection does not read stored KV


def test_bad_config_stops_before_any_job_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs:\n  tiny: {scout: tiny-scout, main: ghost}\n")
    proc = snakemake(tmp_path, "--configfile", str(SMOKE), str(bad))
    assert proc.returncode != 0
    assert "kvpipe: invalid configuration: config: pairs.tiny.main: 'ghost' is not a configured model" in proc.stderr
    assert "Traceback" not in proc.stderr and "File \"" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_cli_runs_the_stages_without_snakemake(tmp_path):
    def kvpipe(*args):
        proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", *args, "-c", str(REPO / "config.yaml"), "-c", str(SMOKE)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    kvpipe("materialize", "--model", "tiny-scout", "--out", "m")
    kvpipe("sample", "--dataset", "synthetic-small", "--tokenizer", "m", "--out", "s.parquet")
    out = kvpipe("extract", "--model-dir", "m", "--samples", "s.parquet", "--out", "kv")
    assert "tiny-scout:" in out and kvstore.load_manifest(tmp_path / "kv")["n_samples"] == 6
    kvpipe("materialize", "--model", "tiny-main", "--out", "m2")
    kvpipe("extract", "--model-dir", "m2", "--samples", "s.parquet", "--out", "kv2")
    kvpipe("structure", "--pair", "tiny", "--scout-kv", "kv", "--main-kv", "kv2", "--out", "st")
    assert (tmp_path / "st" / "metrics.parquet").exists()
    kvpipe("selection", "--pair", "tiny", "--scout-dir", "m", "--main-dir", "m2", "--samples", "s.parquet", "--out", "sel")
    assert "Full-KV baselines" in (tmp_path / "sel" / "summary.md").read_text()
    for sub in ("validate", "materialize", "sample", "extract", "structure", "selection"):
        help_ = subprocess.run([sys.executable, "-m", "kvpipe.cli", sub, "--help"], capture_output=True, text=True)
        assert help_.returncode == 0 and "usage: kvpipe " + sub in help_.stdout


def test_cli_names_unknown_entries_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "materialize", "--model", "ghost", "--out", "x",
                           "-c", str(REPO / "config.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("kvpipe: error: --model: 'ghost' is not in models "
                                   "(qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m)")

"""The `kvpipe` command line runs every stage without Snakemake."""

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import REPO, SMOKE

from kvpipe.cli import parser
from kvpipe.io import read_json
from kvpipe.kv import store as kvstore
from kvpipe.stages import stages


@pytest.mark.slow
def test_cli_runs_the_stages_without_snakemake(tmp_path):
    # the projection stage with two projectors, its layer map from the structure stage's table
    (tmp_path / "projection.yaml").write_text(
        "projection: {projectors: [ridge, mlp], objectives: [reconstruction], layer_map: best_cka, max_test_samples: 2,\n"
        "             conditions: [main_full, no_context, mean_kv, always_abstain, projected_kv, chain]}\n")

    def kvpipe(*args):
        proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", *args, "-c", str(REPO / "config.yaml"),
                               "-c", str(SMOKE), "-c", str(tmp_path / "projection.yaml")], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    kvpipe("materialize", "--model", "tiny-scout", "--out", "m")
    kvpipe("sample", "--dataset", "synthetic-small", "--tokenizer", "m", "--out", "s.parquet")
    out = kvpipe("extract", "--model-dir", "m", "--samples", "s.parquet", "--out", "kv")
    assert "tiny-scout:" in out and kvstore.load_manifest(tmp_path / "kv")["n_samples"] == 6
    kvpipe("materialize", "--model", "tiny-main", "--out", "m2")
    kvpipe("extract", "--model-dir", "m2", "--samples", "s.parquet", "--out", "kv2")
    kvpipe("structure", "--pair", "tiny", "--scout-kv", "kv", "--main-kv", "kv2", "--samples", "s.parquet", "--out", "st")
    metrics = pd.read_parquet(tmp_path / "st" / "metrics.parquet")
    assert {"key", "key_pre_rope", "value"} <= set(metrics["kind"]) and {"none", "mean", "self"} <= set(metrics["baseline"])
    assert metrics["value"].notna().any() and read_json(tmp_path / "st" / "facts.json")["pair"] == "tiny"
    kvpipe("selection", "--pair", "tiny", "--scout-dir", "m", "--main-dir", "m2", "--samples", "s.parquet",
           "--out", "sel")
    assert "Full-KV answers beside the floors" in (tmp_path / "sel" / "summary.md").read_text()
    (tmp_path / "sel" / "summary.md").unlink()
    kvpipe("report", "selection", "--dir", "sel", "--dataset", "synthetic-small")
    assert "Full-KV answers beside the floors" in (tmp_path / "sel" / "summary.md").read_text()
    out = kvpipe("projection", "--pair", "tiny", "--scout-kv", "kv", "--main-kv", "kv2", "--scout-dir", "m", "--main-dir",
                 "m2", "--samples", "s.parquet", "--structure-metrics", "st/metrics.parquet", "--dataset", "synthetic-small",
                 "--out", "proj")
    assert out.startswith("wrote proj/answers.parquet")
    answers = pd.read_parquet(tmp_path / "proj" / "answers.parquet")
    assert set(answers["condition"]) == {"main_full", "no_context", "mean_kv", "always_abstain", "projected_kv", "chain"}
    assert set(answers.loc[answers["condition"] == "projected_kv", "projector"]) == {"ridge", "mlp"}
    assert read_json(tmp_path / "proj" / "facts.json")["layer_map"]["name"] == "best_cka"
    assert sorted(p.name for p in (tmp_path / "proj" / "projectors").glob("*.safetensors")) == [
        "mlp-reconstruction.safetensors", "ridge-reconstruction.safetensors"]
    assert "## " in (tmp_path / "proj" / "summary.md").read_text() and (tmp_path / "proj" / "summary.html").is_file()
    for sub in ("validate", "materialize", "sample", "extract", "structure", "selection", "projection", "report",
                "progress"):
        help_ = subprocess.run([sys.executable, "-m", "kvpipe.cli", sub, "--help"], capture_output=True, text=True)
        assert help_.returncode == 0 and "usage: kvpipe " + sub in help_.stdout


def test_the_cli_has_one_subcommand_per_declared_stage():
    commands = parser()._subparsers._group_actions[0].choices
    names = [s.name for s in stages()]
    assert [c for c in commands if commands[c].get_default("declared") is not None] == names
    for stage in stages():
        options = {a.dest: a for a in commands[stage.name]._actions}
        assert {spec.name for spec in stage.inputs} <= set(options)
        assert all(options[spec.name].required == spec.required for spec in stage.inputs)
    report = next(a for a in commands["report"]._actions if a.dest == "stage")
    assert list(report.choices) == names


@pytest.mark.slow  # the kvpipe command line in a subprocess
def test_cli_names_unknown_entries_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "materialize", "--model", "ghost", "--out", "x",
                           "-c", str(REPO / "config.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("kvpipe: error: --model: 'ghost' is not in models "
                                   "(gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m)")


def test_python_code_is_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "workflow/scripts"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_progress_shows_the_last_update_of_each_recent_job_log(tmp_path):
    logs = tmp_path / "results" / "logs"
    (logs / "extract_kv" / "synthetic").mkdir(parents=True)
    (logs / "materialize_model").mkdir()
    running = logs / "extract_kv" / "synthetic" / "qwen.log"
    running.write_text("torch threads: 2\n\rextract qwen:  10%|#  | 2/20\rextract qwen:  15%|#  | 3/20 [00:30<03:00]")
    old = logs / "materialize_model" / "qwen.log"
    old.write_text("qwen: wheel 3/22 part3==0.2.0: 64.0 MB in 12.0 s (5.3 MB/s)\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "progress"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "1 job log(s) written in the last 15 min" in lines[0] and len(lines) == 2
    assert lines[1].strip().startswith("extract_kv/synthetic/qwen  [")
    assert lines[1].endswith("extract qwen:  15%|#  | 3/20 [00:30<03:00]")   # the bar's last update
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "progress", "--since", "120"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert "materialize_model/qwen  [60 min ago]  qwen: wheel 3/22 part3==0.2.0" in proc.stdout

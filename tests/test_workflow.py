"""End-to-end: the Snakemake DAG on the smoke config (tiny models, seconds), run from a copy of the checkout.

The copy lets tests edit kvpipe modules and watch exactly the expected jobs rerun, and proves
that jobs run the kvpipe of the checkout they belong to, not an installed one.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, planned_jobs, snakemake

from kvpipe.kv import store as kvstore
from kvpipe.stages import stages

pytestmark = pytest.mark.slow   # every test here starts Snakemake (most on the completed smoke run)

STAGE_FIGURES = {stage.name: stage.figures for stage in stages()}
# a pair's jobs (the smoke run's 6 samples make one chunk): structure, and selection and projection per chunk, gathered
PAIR_JOBS = {f"{stage}{suffix}": 1 for stage in STAGE_FIGURES for suffix in ("", "_report")} | {
    "selection_chunk": 1, "projection_fit": 1, "projection_chunk": 1}
RUN_JOBS = {**PAIR_JOBS, "pairs_summary": 1}   # a pair's jobs and the run's cross-pair summary


@contextmanager
def edited(path: Path, text: str = "\n# edited by a test\n") -> Iterator[None]:
    """Append text to a file for the duration of the block."""
    original = path.read_text()
    path.write_text(original + text)
    try:
        yield
    finally:
        path.write_text(original)


def overlay(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"overlay-{abs(hash(text))}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def repo(smoke_repo) -> Path:
    return smoke_repo


def test_smoke_workflow_builds_every_target(repo):
    for stage, figures in STAGE_FIGURES.items():
        out = repo / "results" / stage / "synthetic-small" / "tiny"
        assert (out / "summary.md").read_text().startswith("# ")
        assert json.loads((out / "facts.json").read_text())["pair"] == "tiny"
        for name in figures:
            assert (out / "figures" / f"{name}.png").stat().st_size > 1000
            assert (out / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert "| tiny | same (qwen2) |" in (repo / "results/pairs/synthetic-small/summary.md").read_text()
    answers = pd.read_parquet(repo / "results/selection/synthetic-small/tiny/answers.parquet")
    assert set(answers["method"]) == {"full", "q2c", "snapkv", "random", "no_context", "always_abstain"}
    assert answers["sample_idx"].nunique() == 6
    samples = pd.read_parquet(repo / "results/data/synthetic-small/samples.parquet")
    assert len(samples) == 6 and list(samples.columns)[:7] == ["sample_idx", "id", "title", "context", "question",
                                                                 "answers", "is_impossible"]
    for model, layers in (("tiny-scout", 2), ("tiny-main", 3)):
        root = repo / "results/kv/synthetic-small" / model
        manifest = kvstore.load_manifest(root)
        assert manifest["model"] == model and manifest["layers"] == list(range(layers))
        assert manifest["n_samples"] == 6
        assert kvstore.read_layer(root, layers - 1).num_rows == manifest["rows_per_layer"]
        assert (repo / f"results/logs/extract_kv/synthetic-small/{model}.log").read_text().startswith("torch threads: ")
        assert (repo / f"results/benchmarks/extract_kv_chunk/synthetic-small/{model}/0000.tsv").read_text().startswith("s\t")
    card = json.loads((repo / "results/models/tiny-main/kvpipe_model.json").read_text())
    assert card["slug"] == "tiny-main"


def test_rerun_does_nothing_and_one_model_change_reruns_only_its_jobs(repo, tmp_path):
    assert planned_jobs(snakemake(repo, "-n")) == {}
    change = overlay(tmp_path, "models:\n  tiny-main: {seed: 9}\n")
    # that model, its KV, and the analyses of the one pair that uses it; the dataset is not resampled
    assert planned_jobs(snakemake(repo, "-n", overlays=(change,))) == {"materialize_model": 1, "extract_kv_chunk": 1,
                                                                        "extract_kv": 1, **RUN_JOBS, "all": 1}
    resources = overlay(tmp_path, "resources:\n  models:\n    tiny-main: {mem_mb: 1200}\n")
    assert planned_jobs(snakemake(repo, "-n", overlays=(resources,))) == {}


def test_extraction_setting_reruns_extraction_only(repo, tmp_path):
    change = overlay(tmp_path, "extraction: {storage_dtype: float16}\n")
    plan = planned_jobs(snakemake(repo, "-n", overlays=(change,)))
    # selection reads no stored KV
    assert plan == {"extract_kv_chunk": 2, "extract_kv": 2, "structure": 1, "structure_report": 1, "projection_fit": 1,
                    "projection_chunk": 1, "projection": 1, "projection_report": 1, "pairs_summary": 1, "all": 1}


@pytest.mark.parametrize("module, expected", [
    ("structure/report.py", {"structure_report": 1}),
    ("selection/report.py", {"selection_report": 1, "pairs_summary": 1}),
    ("reporting.py", {"structure_report": 1, "selection_report": 1, "projection_report": 1, "pairs_summary": 1}),
    ("markdown_html.py", {"structure_report": 1, "selection_report": 1, "projection_report": 1, "pairs_summary": 1}),
    ("projection/mlp.py", {"projection_fit": 1, "projection_chunk": 1, "projection": 1, "projection_report": 1}),
    ("structure/cka.py", {"structure": 1, "structure_report": 1, "pairs_summary": 1}),  # defines linear_cka
    # every rule that builds prompts, and the gathers that read the KV store's segment names
    ("data/prompt.py", {"sample_chunk": 1, "sample_dataset": 1, "extract_kv_chunk": 2, "extract_kv": 2, **RUN_JOBS}),
])
def test_editing_a_module_reruns_exactly_the_rules_that_run_it(repo, module, expected):
    assert "def linear_cka" in (repo / "src/kvpipe/structure/cka.py").read_text()
    with edited(repo / "src" / "kvpipe" / module):
        assert planned_jobs(snakemake(repo, "-n")) == expected | {"all": 1}
    assert planned_jobs(snakemake(repo, "-n")) == {}


def test_a_new_pair_with_a_new_model_runs_only_that_model_and_pair(repo, tmp_path):
    change = overlay(tmp_path, "models:\n  tiny-new: {source: tiny, arch: qwen2, layers: 2, hidden_size: 32, seed: 4}\n"
                               "pairs:\n  tiny2: {scout: tiny-scout, main: tiny-new}\n"
                               "run:\n  pairs: [tiny, tiny2]\n")
    plan = planned_jobs(snakemake(repo, "-n", overlays=(change,)))
    assert plan == {"materialize_model": 1, "extract_kv_chunk": 1, "extract_kv": 1, **RUN_JOBS, "all": 1}


def test_one_pair_setting_reruns_only_that_pairs_selection(repo, tmp_path):
    change = overlay(tmp_path, "pairs:\n  tiny: {selection: {max_new_tokens: 3}}\n")
    assert planned_jobs(snakemake(repo, "-n", overlays=(change,))) == {"selection_chunk": 1, "selection": 1,
                                                                        "selection_report": 1, "pairs_summary": 1,
                                                                        "all": 1}
    same = overlay(tmp_path, "pairs:\n  tiny: {selection: {max_new_tokens: 4}}\n")  # the global value: nothing changes
    assert planned_jobs(snakemake(repo, "-n", overlays=(same,))) == {}


def test_best_cka_layer_map_reads_the_structure_metrics(repo, tmp_path):
    change = overlay(tmp_path, "pairs:\n  tiny: {projection: {layer_map: best_cka}}\n")
    proc = snakemake(repo, "-n", "--forceall", "results/projection/synthetic-small/tiny/answers.parquet",
                     overlays=(change,))
    assert planned_jobs(proc)["structure"] == 1   # the projection job now needs the structure stage's table
    proc = snakemake(repo, "-n", "--forceall", "results/projection/synthetic-small/tiny/answers.parquet")
    assert "structure" not in planned_jobs(proc)


def test_editing_the_dataset_file_resamples(repo, tmp_path):
    context = "The Normans were the people who gave their name to Normandy, a region in France."
    doc = {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": f"Question {i} about the Normans?", "is_impossible": False,
         "answers": [{"text": "Normandy", "answer_start": context.index("Normandy")}]} for i in range(4)]}]}]}
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(doc))
    change = overlay(tmp_path, f"datasets:\n  sq: {{source: squad_v2, path: {squad}}}\nsampling: {{n: 3}}\n")
    target = "results/data/sq/samples.parquet"
    assert snakemake(repo, target, overlays=(change,)).returncode == 0
    assert planned_jobs(snakemake(repo, "-n", target, overlays=(change,))) == {}
    doc["data"][0]["paragraphs"][0]["qas"][0]["question"] = "Edited question about the Normans?"
    squad.write_text(json.dumps(doc))
    assert planned_jobs(snakemake(repo, "-n", target, overlays=(change,))) == {"sample_chunk": 1, "sample_dataset": 1}


def test_a_gguf_path_is_an_input_of_materialisation(repo, tmp_path):
    gguf = tmp_path / "model.gguf"
    change = overlay(tmp_path, f"models:\n  tiny-gguf: {{source: gguf, path: {gguf}}}\n")
    target = "results/models/tiny-gguf/kvpipe_model.json"
    proc = snakemake(repo, "-n", target, overlays=(change,))
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Missing input files" in said and str(gguf) in said
    gguf.write_bytes(b"GGUF")
    assert planned_jobs(snakemake(repo, "-n", target, overlays=(change,))) == {"materialize_model": 1}


def test_jobs_run_the_kvpipe_of_their_checkout(repo, tmp_path):
    marker = "kvpipe-planted-marker-7f3a"
    change = overlay(tmp_path, "datasets:\n  synthetic-marker: {source: synthetic, seed: 5, passages: 4}\n")
    with edited(repo / "src/kvpipe/data/sampling.py", f"\nraise RuntimeError({marker!r})\n"):
        proc = snakemake(repo, "results/data/synthetic-marker/samples.parquet", overlays=(change,))
    assert proc.returncode != 0
    log = repo / "results/logs/sample_chunk/synthetic-marker/0000.log"
    assert marker in proc.stderr + (log.read_text() if log.exists() else "")
    assert marker not in (REPO / "src/kvpipe/data/sampling.py").read_text()


def fresh_copy(repo: Path, tmp_path: Path) -> Path:
    """A copy of the completed smoke run that a test may change (the module's runs share `repo`)."""
    return Path(shutil.copytree(repo, tmp_path / "repo", symlinks=True))


def test_bad_input_under_snakemake_is_one_line_naming_the_rule(repo, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    change = overlay(tmp_path, f"datasets:\n  broken: {{source: squad_v2, path: {bad}}}\n")
    proc = snakemake(repo, "results/data/broken/samples.parquet", overlays=(change,))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("kvpipe:")]
    assert line.startswith(f"kvpipe: error in rule sample_chunk: {bad}: not valid JSON (")   # the one chunk's job
    assert (repo / "results/logs/sample_chunk/broken/0000.log").read_text().splitlines()[-1] == line
    assert not (repo / "results/data/broken").exists()


def test_rematerialising_the_sampling_tokenizer_model_does_not_resample(repo, tmp_path):
    """README: the sample table depends on the dataset and `sampling` only; the card of the sampling.tokenizer model
    is an ancient input, so new weights for that model (same tokenizer) rerun its extraction, never the sampling."""
    copy = fresh_copy(repo, tmp_path)
    samples = copy / "results/data/synthetic-small/samples.parquet"
    before = samples.read_bytes(), samples.stat().st_mtime_ns
    card = copy / "results/models/tiny-scout/kvpipe_model.json"
    old = json.loads(card.read_text())["fingerprint"]
    weights = overlay(tmp_path, "models:\n  tiny-scout: {seed: 11}\n")
    proc = snakemake(copy, "results/models/tiny-scout/kvpipe_model.json", overlays=(weights,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(card.read_text())["fingerprint"] != old   # new weights, written
    plan = planned_jobs(snakemake(copy, "-n", overlays=(weights,)))
    assert "sample_dataset" not in plan and plan["extract_kv"] == 1   # the model's KV is redone, its samples are not
    assert (samples.read_bytes(), samples.stat().st_mtime_ns) == before


def test_a_pair_of_two_tokenizers_runs_structure_and_selection_through_snakemake(repo, tmp_path):
    copy = fresh_copy(repo, tmp_path)
    change = overlay(tmp_path, "pairs:\n  cross: {scout: tiny-scout, main: tiny-llama}\n"
                               "run: {pairs: [tiny, cross], stages: [structure, selection]}\n")
    targets = [f"results/{stage}/synthetic-small/cross/summary.md" for stage in ("structure", "selection")]
    proc = snakemake(copy, *targets, "results/pairs/synthetic-small/summary.md", overlays=(change,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((copy / "results/structure/synthetic-small/cross/facts.json").read_text())
    assert facts["alignment"]["identity"] is False and facts["alignment"]["pool"] == "mean"
    overlap = pd.read_parquet(copy / "results/selection/synthetic-small/cross/overlap.parquet")
    assert overlap["char_overlap"].between(0, 1).all() and overlap["sample_idx"].nunique() == 6
    assert "| cross |" in (copy / "results/pairs/synthetic-small/summary.md").read_text()
    assert planned_jobs(snakemake(copy, "-n", *targets, overlays=(change,))) == {}


def readme_command(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """A snakemake command exactly as the README writes it (no --cores), run in the checkout, on the smoke config."""
    return subprocess.run([sys.executable, "-m", "snakemake", *args, "--configfile", str(repo / "tests/smoke/config.yaml")],
                          cwd=repo, capture_output=True, text=True, timeout=600)


def test_html_report_holds_every_figure(repo):
    proc = readme_command(repo, "--report", "results/report.html")   # the README's command
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR/" not in proc.stderr, proc.stderr   # every caption is valid reStructuredText
    html = (repo / "results" / "report.html").read_text(errors="replace")
    for name in (name for figures in STAGE_FIGURES.values() for name in figures):
        assert f"{name}.png" in html
    # the summaries as HTML pages, which the report shows inline (it offers Markdown only as a download)
    pages = {stage.name: ["summary", *(["timing"] if stage.timing else [])] for stage in stages()}
    for stage, names in pages.items():
        for name in names:
            rendered = (repo / "results" / stage / "synthetic-small" / "tiny" / f"{name}.html").read_text()
            assert rendered.startswith("<!DOCTYPE html>") and "<table>" in rendered
            assert f"{stage}/synthetic-small/tiny/{name}.html" in html and f"tiny/{name}.md" not in html
    assert "results/pairs/synthetic-small/summary.html" in html


def test_rulegraph_needs_no_cores(repo):
    proc = readme_command(repo, "--rulegraph")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.lstrip().startswith("digraph") and "projection_report" in proc.stdout


def test_rule_files_are_snakefmt_formatted_and_lint_clean():
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "tests/smoke/config.yaml"],
                          cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr


def test_every_figure_and_page_has_one_caption():
    for stage in stages():
        captions = {p.stem for p in (REPO / "workflow" / "report" / stage.name).glob("*.rst")}
        assert captions == {*stage.figures, "summary", *(["timing"] if stage.timing else [])}


def test_bad_config_stops_before_any_job_with_one_line(tmp_path):
    bad = overlay(tmp_path, "pairs:\n  tiny: {scout: tiny-scout, main: ghost}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "1", "--configfile", str(REPO / "tests/smoke/config.yaml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "kvpipe: invalid configuration: config: pairs.tiny.main: 'ghost' is not a configured model" in proc.stderr
    assert "Traceback" not in proc.stderr and "File \"" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_pair_without_a_shared_tokenizer_is_refused_with_projection_before_any_job(tmp_path):
    bad = overlay(tmp_path, "pairs:\n  tiny: {scout: tiny-scout, main: tiny-llama}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "1", "--configfile", str(REPO / "tests/smoke/config.yaml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kvpipe:")]
    assert lines == [line for line in lines if "pair tiny" in line and "run.stages" in line] and len(lines) == 1
    assert not (tmp_path / "results").exists()
    fine = overlay(tmp_path, "pairs:\n  tiny: {scout: tiny-scout, main: tiny-llama}\nrun: {stages: [structure, selection]}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                           "--cores", "1", "--configfile", str(REPO / "tests/smoke/config.yaml"), str(fine)],
                          capture_output=True, text=True)
    assert "projection" not in planned_jobs(proc) and planned_jobs(proc)["selection"] == 1


def test_cross_family_overlay_plans_both_directions_and_the_pairs_summary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                           "--cores", "2", "--configfile", str(REPO / "config/cross_family.yaml")],
                          capture_output=True, text=True)
    plan = planned_jobs(proc)
    assert plan["structure"] == plan["selection"] == 5 and plan["pairs_summary"] == 1
    assert plan["extract_kv"] == plan["materialize_model"] == 4   # qwen 0.5b/1.5b, smollm2, gemma3
    assert "projection" not in plan   # run.stages leaves it out: it needs a shared tokenizer


def test_usable_as_a_snakemake_module_from_a_wrapper_in_another_directory(tmp_path):
    """`module kvpipe: snakefile: ...` as snakedeploy writes it: scripts, code hashes and config.yaml come from the
    checkout, not from the wrapper's directory (workflow.basedir); the wrapper's config is an overlay."""
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "tests/smoke/config.yaml", tmp_path / "config/config.yaml")
    (tmp_path / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n\n'
        f'module kvpipe:\n    snakefile:\n        "{REPO / "Snakefile"}"\n    config:\n        config\n\n\n'
        "use rule * from kvpipe as kvpipe_*\n")

    def wrapper(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    plan = planned_jobs(wrapper("-n"))
    assert plan == {f"kvpipe_{rule}": n for rule, n in {"materialize_model": 2, "sample_chunk": 1, "sample_dataset": 1,
                                                         "extract_kv_chunk": 2, "extract_kv": 2, **RUN_JOBS,
                                                         "all": 1}.items()}
    target = "results/data/synthetic-small/samples.parquet"
    proc = wrapper(target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results/logs/sample_dataset/synthetic-small.log").read_text().startswith("torch threads: ")
    # the checkout's own Snakefile, run in the same directory, finds nothing to redo: same params, same code hashes
    direct = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "-n",
                             target, "--configfile", str(REPO / "tests/smoke/config.yaml")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert planned_jobs(direct) == {}

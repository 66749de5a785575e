"""Sample chunks: prefix-stable sampling, the scatter of extraction and answering per chunk, the gathers, and what
reruns when sampling.n grows (dry runs of the smoke workflow, like tests/test_workflow.py's rerun tables)."""

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, planned_jobs

from kvpipe.chunks import chunk_names, chunk_range, concat_tables, gather_kv
from kvpipe.config import load_config, validate
from kvpipe.data.sampling import load_dataset, sample
from kvpipe.errors import KvpipeError
from kvpipe.kv import extract as ex
from kvpipe.kv import store as kvstore
from kvpipe.models.load import load_tokenizer

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 2, "compression": "zstd"}


def test_chunks_are_fixed_ranges_of_sample_idx():
    assert chunk_names(6, 4) == ["0000", "0001"] and chunk_names(8, 4) == ["0000", "0001"] and chunk_names(9, 4)[-1] == "0002"
    assert chunk_range("0001", 6, 4) == (4, 6) and chunk_range("0001", 50, 4) == (4, 8)
    with pytest.raises(KvpipeError, match="chunk 0002: no samples"):
        chunk_range("0002", 8, 4)


def test_chunk_size_must_hold_whole_shards():
    config = load_config([REPO / "config.yaml"])
    config["run"]["chunk_size"] = 12
    with pytest.raises(KvpipeError, match=r"run.chunk_size: 12 is not a multiple of extraction.shard_size=8"):
        validate(config)


def test_sampling_is_prefix_stable_and_a_chunk_is_its_rows_of_the_whole(smoke_config, model_dirs):
    """Growing n appends samples: the first n of a larger n are the same rows, and samples [start, n) sampled
    alone are those rows of the whole table, byte for byte once concatenated."""
    tok = [load_tokenizer(model_dirs["tiny-scout"])]
    examples = load_dataset("synthetic-small", smoke_config["datasets"]["synthetic-small"])
    cfg = smoke_config["sampling"]
    whole = sample(examples, tok, smoke_config["prompt"], cfg | {"n": 10})
    pd.testing.assert_frame_equal(sample(examples, tok, smoke_config["prompt"], cfg | {"n": 6}), whole.iloc[:6])
    parts = [sample(examples, tok, smoke_config["prompt"], cfg | {"n": end}, start=start) for start, end in ((0, 4), (4, 10))]
    assert list(parts[1]["sample_idx"]) == list(range(4, 10))
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_gathered_tables_equal_one_table_and_empty_chunks_add_nothing(tmp_path):
    frames = [
        pd.DataFrame({"sample_idx": [0, 1], "f1": [0.5, 1.0]}),
        pd.DataFrame(),
        pd.DataFrame({"sample_idx": [5], "f1": [0.0]}),
    ]
    for i, frame in enumerate(frames):
        frame.to_parquet(tmp_path / f"{i}.parquet", index=False)
    concat_tables([tmp_path / f"{i}.parquet" for i in range(3)], tmp_path / "gathered.parquet")
    pd.DataFrame({"sample_idx": [0, 1, 5], "f1": [0.5, 1.0, 0.0]}).to_parquet(tmp_path / "one.parquet", index=False)
    assert (tmp_path / "gathered.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()


def test_kv_chunks_gather_into_the_dataset_one_extraction_writes(tmp_path, model_dirs, samples_path, smoke_config):
    """Two chunks' extractions, gathered: the same manifest and shard files, byte for byte, as one extraction."""
    prompt = smoke_config["prompt"]
    whole = ex.extract(model_dirs["tiny-main"], samples_path, tmp_path / "whole", EXTRACTION, prompt, "cpu", "s")
    table = pd.read_parquet(samples_path)
    roots = []
    for first, end in (chunk_range(c, len(table), 4) for c in chunk_names(len(table), 4)):
        chunk = tmp_path / f"chunk-{first}.parquet"
        table.iloc[first:end].to_parquet(chunk, index=False)
        roots.append(tmp_path / "chunks" / str(first))
        ex.extract(model_dirs["tiny-main"], chunk, roots[-1], EXTRACTION, prompt, "cpu", "s")
    gathered = gather_kv(roots, samples_path, tmp_path / "gathered")
    assert gathered == whole and len(whole["shards"]) == 3
    assert (tmp_path / "gathered" / kvstore.MANIFEST).read_bytes() == (tmp_path / "whole" / kvstore.MANIFEST).read_bytes()
    for rel in kvstore.shard_digests(whole):
        assert (tmp_path / "gathered" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()
    assert kvstore.read_layer(tmp_path / "gathered", 2).equals(kvstore.read_layer(tmp_path / "whole", 2))
    with pytest.raises(KvpipeError, match="samples, but the KV chunks hold 4"):
        gather_kv(roots[:1], samples_path, tmp_path / "short")


def overlay(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"overlay-{abs(hash(text))}.yaml"
    path.write_text(text)
    return path


def run_here(repo: Path, workdir: Path, *args: str, overlays: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """snakemake on repo's Snakefile and smoke config, in another working directory."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(repo / "Snakefile"),
            "-d",
            str(workdir),
            "--cores",
            "2",
            *args,
            "--configfile",
            str(repo / "tests/smoke/config.yaml"),
            *map(str, overlays),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )


def gathered_files(results: Path) -> dict[str, Path]:
    """Every table and text a run leaves under results/, but chunks, logs, benchmarks, figures, the answering state and
    what the stages measured in seconds (kvpipe.stages.Stage.timing, fit timings, timing reports, ttft aggregates)."""
    measured = {
        "timings.parquet",
        "timings.json",
        "fit_timings.json",
        "ttft.parquet",
        "ttft_aggregates.parquet",
        "timing.md",
        "timing.html",
        "answering.pt",
    }
    return {
        str(p.relative_to(results)): p
        for p in sorted(results.rglob("*"))
        if p.is_file()
        and not {"chunks", "logs", "benchmarks", "figures", "models"} & set(p.relative_to(results).parts)
        and p.name not in measured
    }


@pytest.fixture(scope="module")
def chunked(smoke_repo, tmp_path_factory) -> Path:
    """A working directory where the smoke workflow ran with chunks of 4 samples (the smoke_repo's: one of 16)."""
    workdir = tmp_path_factory.mktemp("chunked")
    proc = run_here(smoke_repo, workdir, overlays=(overlay(workdir, "run: {chunk_size: 4}\n"),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_chunked_run_equals_the_unchunked_one_byte_for_byte(smoke_repo, chunked):
    assert sorted(p.name for p in (chunked / "results/data/synthetic-small/chunks").iterdir()) == ["0000.parquet", "0001.parquet"]
    assert not (smoke_repo / "results/data/synthetic-small/chunks/0001.parquet").exists()
    one, two = gathered_files(smoke_repo / "results"), gathered_files(chunked / "results")
    assert one.keys() == two.keys()
    assert {
        "selection/synthetic-small/tiny/answers.parquet",
        "projection/synthetic-small/tiny/answers.parquet",
        "kv/synthetic-small/tiny-main/manifest.json",
        "kv/synthetic-small/tiny-main/layer=02/shard-00001.parquet",
        "data/synthetic-small/samples.parquet",
        "projection/synthetic-small/tiny/aggregates.parquet",
    } <= one.keys()
    different = [name for name in one if not filecmp.cmp(one[name], two[name], shallow=False)]
    assert different == []
    answers = pd.read_parquet(chunked / "results/projection/synthetic-small/tiny/chunks/0001/answers.parquet")
    assert set(answers["sample_idx"]) <= {4, 5} and len(answers)  # the second chunk answered its own test samples


@pytest.mark.slow
def test_growing_n_reruns_only_the_new_and_the_partial_chunk(chunked, smoke_repo, tmp_path):
    """n 6 -> 10 with chunks of 4: chunk 0000 stays; 0001 (was partial) and the new 0002 run, then the gathers.
    The fits see more calibration passages: structure and the projectors refit, so every projection chunk reruns."""
    grown = (overlay(tmp_path, "run: {chunk_size: 4}\n"), overlay(tmp_path, "sampling: {n: 10}\n"))
    proc = run_here(smoke_repo, chunked, "-n", overlays=grown)
    assert planned_jobs(proc) == {
        "sample_chunk": 2,
        "sample_dataset": 1,
        "extract_kv_chunk": 4,
        "extract_kv": 2,
        "selection_chunk": 2,
        "selection": 1,
        "selection_report": 1,
        "structure": 1,
        "structure_report": 1,
        "projection_fit": 1,
        "projection_chunk": 3,
        "projection": 1,
        "projection_report": 1,
        "pairs_summary": 1,
        "all": 1,
    }
    planned = set(re.findall(r"rule (\w+_chunk):\n(?:    .*\n)*?    wildcards: .*chunk=(\d{4})", proc.stdout))
    assert ("extract_kv_chunk", "0000") not in planned and ("selection_chunk", "0000") not in planned
    assert ("projection_chunk", "0000") in planned and ("extract_kv_chunk", "0002") in planned


FANOUT = """# 3B -> 7B on 1,000 SQuAD v2 questions, every one answered (README: running at scale)
datasets:
  squad_v2: {{path: {squad}}}
sampling: {{n: 1000}}
selection: {{max_samples: null}}
projection: {{max_test_samples: null}}
"""


def gpu_jobs(dry_run: str) -> dict[str, int]:
    """Rule -> jobs of a dry run that ask for a GPU (gpu=1 among their resources)."""
    blocks = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", dry_run, re.M)
    counts: dict[str, int] = {}
    for rule, body in blocks:
        if re.search(r"resources: .*\bgpu=1\b", body):
            counts[rule] = counts.get(rule, 0) + 1
    return counts


@pytest.mark.slow
def test_readme_states_the_gpu_fan_out_of_a_3b_7b_run_on_1000_squad_questions(tmp_path):
    squad = tmp_path / "dev-v2.0.json"
    squad.write_text("{}")  # a dry run reads no dataset
    fanout = overlay(tmp_path, FANOUT.format(squad=squad))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "-n",
            "--cores",
            "8",
            "--configfile",
            str(REPO / "config/squad_v2.yaml"),
            str(REPO / "config/qwen2.5-3b-7b.yaml"),
            str(fanout),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    plan = planned_jobs(proc)
    gpus = gpu_jobs(proc.stdout)
    chunks = len(chunk_names(1000, 16))
    assert gpus == {"extract_kv_chunk": 2 * chunks, "selection_chunk": chunks, "projection_fit": 1, "projection_chunk": chunks}
    assert all(plan[rule] == n for rule, n in gpus.items())
    readme = " ".join((REPO / "README.md").read_text().split())
    total = sum(gpus.values())
    assert (
        f"fans out to {total} GPU jobs: {gpus['extract_kv_chunk']} extraction chunks, {gpus['selection_chunk']} "
        f"selection chunks, one projector fit and {gpus['projection_chunk']} projection chunks"
    ) in readme

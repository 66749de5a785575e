"""Where a workflow run keeps its results: the layout under `results/`, one function per kind of output.

The rule files (workflow/rules/*.smk) write these paths, with Snakemake's wildcards in place of the names
(a test checks that they agree); tools that read a finished run, such as the benchmarks under bench/, take
the paths from here. Every function takes the results root (default `results`, relative to the run's
working directory).
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path("results")


def model_dir(slug: str, root: Path = RESULTS) -> Path:
    """A materialised model: safetensors, tokenizer, config and kvpipe_model.json."""
    return Path(root) / "models" / slug


def samples_file(dataset: str, root: Path = RESULTS) -> Path:
    """A dataset's seeded sample table."""
    return Path(root) / "data" / dataset / "samples.parquet"


def kv_dir(dataset: str, model: str, root: Path = RESULTS) -> Path:
    """A model's KV dataset on a dataset (layer partitions and manifest.json)."""
    return Path(root) / "kv" / dataset / model


def stage_dir(stage: str, dataset: str, pair: str, root: Path = RESULTS) -> Path:
    """An analysis stage's outputs for one pair on one dataset (tables, summary, figures/)."""
    return Path(root) / stage / dataset / pair


def pairs_dir(dataset: str, root: Path = RESULTS) -> Path:
    """The cross-pair summary of a dataset."""
    return Path(root) / "pairs" / dataset


def logs_dir(root: Path = RESULTS) -> Path:
    """Every job's log, by rule."""
    return Path(root) / "logs"


def benchmarks_dir(root: Path = RESULTS) -> Path:
    """Every job's Snakemake benchmark (seconds, memory), by rule."""
    return Path(root) / "benchmarks"


def log_file(rule: str, *names: str, root: Path = RESULTS) -> Path:
    """A job's log: results/logs/{rule}/{wildcard values}.log."""
    return logs_dir(root).joinpath(rule, *names[:-1], f"{names[-1]}.log")


def benchmark_file(rule: str, *names: str, root: Path = RESULTS) -> Path:
    """A job's benchmark: results/benchmarks/{rule}/{wildcard values}.tsv."""
    return benchmarks_dir(root).joinpath(rule, *names[:-1], f"{names[-1]}.tsv")

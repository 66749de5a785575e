"""Shared fixtures: the smoke configuration and tiny random models, built offline in-process."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import DynamicCache

from kvpipe.config import load_config
from kvpipe.data.sampling import sample_to_file
from kvpipe.models.load import load_model
from kvpipe.models.materialize import materialize

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "smoke" / "config.yaml"


def copy_checkout(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, copied to dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def fill_slurm_placeholders(profile: Path, cpu: str = "cpu", gpu: str = "gpu") -> Path:
    """Fill profile/config.yaml's commented partition placeholders as a site would: uncomment each
    `slurm_partition` line, naming the CPU or GPU partition (the account stays commented)."""
    config = profile / "config.yaml"
    text = config.read_text()
    for placeholder, name in (("<cpu-partition>", cpu), ("<gpu-partition>", gpu)):
        text = re.sub(rf"^(\s*)# slurm_partition: {placeholder}", rf"\g<1>slurm_partition: {name}", text, flags=re.M)
    config.write_text(text)
    return profile


SYSTEM_SLURM_CONF = "/etc/slurm/slurm.conf"  # profiles/slurm/testcluster.sh links it to its cluster's slurm.conf


def missing_slurm_prerequisite() -> str | None:
    """Why tests/test_slurm.py's test cluster cannot run here, or None."""
    if os.environ.get("KVPIPE_SLURM_TESTS") == "0":
        return "KVPIPE_SLURM_TESTS=0 switches the SLURM cluster tests off"
    missing = [tool for tool in ("sbatch", "squeue", "scancel", "slurmctld", "slurmd", "munged") if not shutil.which(tool)]
    if missing:
        return f"SLURM and munge are not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the SLURM test cluster runs as root (profiles/slurm/testcluster.sh)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed: pip install -e '.[test]'"
    conf = Path(SYSTEM_SLURM_CONF)
    if conf.exists():  # a link left dangling by a test cluster that is gone does not count
        left = conf.resolve().parent
        if conf.is_symlink() and left.name.startswith("kvpipe-slurm-test-"):   # a test session killed mid-run
            return (f"{SYSTEM_SLURM_CONF} belongs to a test cluster still running: "
                    f"KVPIPE_SLURM_DIR={left} profiles/slurm/testcluster.sh stop")
        return f"{SYSTEM_SLURM_CONF} exists (a real cluster, or a test cluster started by hand: stop it first)"
    return None


def snakemake_command(repo: Path, *args: str, overlays: tuple[Path, ...] = ()) -> list[str]:
    """snakemake on repo's Snakefile and smoke config, 2 cores (args before the config files)."""
    smoke = repo / "tests" / "smoke" / "config.yaml"
    return [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(repo), "--cores", "2", *args,
            "--configfile", str(smoke), *map(str, overlays)]  # last: --configfile takes every word after it


SNAKEMAKE_TIMEOUT_S = int(os.environ.get("KVPIPE_TEST_SNAKEMAKE_TIMEOUT", "1800"))  # a loaded 2-core machine needs >600


def snakemake(repo: Path, *args: str, overlays: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run snakemake_command, bounded by SNAKEMAKE_TIMEOUT_S."""
    return subprocess.run(snakemake_command(repo, *args, overlays=overlays), capture_output=True, text=True,
                          timeout=SNAKEMAKE_TIMEOUT_S)


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table (empty when nothing is to be done)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = proc.stdout.split("Job stats:")[1] if "Job stats:" in proc.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"}


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """A copy of the checkout on which the smoke workflow has run to completion."""
    copy = copy_checkout(tmp_path_factory.mktemp("checkout"))
    proc = snakemake(copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return copy


@pytest.fixture(scope="session")
def smoke_config() -> dict:
    return load_config([REPO / "config.yaml", SMOKE])


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, smoke_config) -> dict[str, Path]:
    """Materialised tiny models: two Qwen2 sharing a tokenizer, one Llama with its own."""
    root = tmp_path_factory.mktemp("models")
    return {slug: Path(root / slug) for slug in ("tiny-scout", "tiny-main", "tiny-llama")
            if materialize(slug, smoke_config["models"][slug], root / slug)}


@pytest.fixture(scope="session")
def samples_path(tmp_path_factory, smoke_config, model_dirs) -> Path:
    out = tmp_path_factory.mktemp("data") / "samples.parquet"
    sample_to_file("synthetic-small", smoke_config["datasets"]["synthetic-small"],
                   model_dirs[smoke_config["sampling"]["tokenizer"]], smoke_config["prompt"], smoke_config["sampling"], out)
    return out


@pytest.fixture(scope="session")
def samples(samples_path) -> pd.DataFrame:
    return pd.read_parquet(samples_path)


@pytest.fixture(scope="session")
def tiny_main(model_dirs):
    return load_model(model_dirs["tiny-main"], "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_llama(model_dirs):
    return load_model(model_dirs["tiny-llama"], "cpu", "float32")


def press_kept(lm, press, tokens):
    """Per layer and KV head, the prefix positions a ScorerPress keeps (compress's own topk of its scores)."""
    from kvpress.utils import compute_n_kept

    kept, score = {}, press.score

    def recording(module, *args):
        scores = score(module, *args)
        n = compute_n_kept(scores.shape[-1], press.compression_ratio)
        kept[module.layer_idx] = scores[0].topk(n, dim=-1).indices.sort(dim=-1).values.numpy()
        return scores

    press.score = recording
    ids = torch.as_tensor(tokens.input_ids[: tokens.context_end])[None]
    with torch.inference_mode(), press(lm.model):
        lm.model.model(input_ids=ids, past_key_values=DynamicCache())
    return np.stack([kept[layer] for layer in sorted(kept)])

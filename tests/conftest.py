"""Shared fixtures: the smoke configuration and tiny random models, built offline in-process."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvpipe.config import load_config
from kvpipe.data.sampling import sample_to_file
from kvpipe.models.load import load_model
from kvpipe.models.materialize import materialize

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "smoke" / "config.yaml"


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

"""The gather of the selection stage: its chunks' tables one after the other, and the run's facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.chunks import concat_tables
from kvpipe.io import read_json, write_json
from kvpipe.models.load import CARD

TABLES = ("answers", "overlap", "timings")  # what a chunk writes, row by sample: gathered by concatenation
ROLES = ("scout", "main")


def write_facts(
    out_dir: Path, pair: str, cfg: dict[str, Any], models: dict[str, Path], answers: pd.DataFrame, samples: Path | str
) -> None:
    """facts.json of a pair's run: how many samples answered (in answers) of those sampled, the settings, the models."""
    answered = answers["sample_idx"].nunique() if len(answers) else 0
    sampled = len(pd.read_parquet(samples, columns=["sample_idx"]))
    write_json(
        Path(out_dir) / "facts.json",
        {
            "pair": pair,
            "n_samples": int(answered),
            "n_sampled": sampled,
            "selection": cfg,
            **{role: read_json(Path(models[role]) / CARD)["slug"] for role in ROLES},
        },
    )


def gather(
    chunks: list[Path], samples: Path | str, models: dict[str, Path], pair: str, cfg: dict[str, Any], out_dir: Path
) -> None:
    """The TABLES of the chunks (directories, in sample order) concatenated under out_dir, and facts.json."""
    tables = {
        name: concat_tables([Path(c) / f"{name}.parquet" for c in chunks], Path(out_dir) / f"{name}.parquet") for name in TABLES
    }
    write_facts(out_dir, pair, cfg, models, tables["answers"], samples)

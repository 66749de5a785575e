"""Report of the projection stage, from its tables alone: aggregates, figures, summary and timing.

Reads answers and projector metrics Parquet and facts.json (written by the stage's compute rule)
for the run-invariant outputs, and the timing files (ttft.parquet, timings.parquet, timings.json)
for timing.md and ttft_aggregates.parquet; the numbers come from kvpipe.projection.aggregate, the
figures from kvpipe.projection.figures, the text from kvpipe.projection.summary. The workflow
imports FIGURES when it builds the DAG, so matplotlib is imported only inside the drawing functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.config import section_defaults
from kvpipe.estimands import with_failure_flags
from kvpipe.io import read_json, write_parquet, write_text
from kvpipe.projection import figures
from kvpipe.projection.aggregate import aggregate, ttft_aggregate
from kvpipe.projection.summary import summary_markdown, timing_markdown
from kvpipe.reporting import save_figure
from kvpipe.settings import ProjectionSettings, recorded

_DRAW = {"f1_vs_bytes": figures.f1_vs_bytes, "f1_by_condition": figures.f1_by_condition,
         "r2_by_layer": figures.r2_by_layer}
FIGURES = tuple(_DRAW)


def write_report(answers: Path, metrics: Path, facts: Path, timing: dict[str, Path], dataset: str, out_dir: Path,
                 verdicts: Mapping[str, Any] | None = None) -> None:
    """aggregates.parquet, summary.md and figures/{FIGURES}.png|pdf under out_dir, from the stage's tables;
    ttft_aggregates.parquet and timing.md from its timing files (timing: STAGE.timing name -> path).
    verdicts: the config's `verdicts` section (default: the schema's)."""
    answers_t, metrics_t = with_failure_flags(pd.read_parquet(answers)), pd.read_parquet(metrics)
    about = read_json(Path(facts))
    settings = recorded(ProjectionSettings, "projection", about["projection"])
    margin = (verdicts or section_defaults("verdicts"))["equivalence_margin"]
    agg = aggregate(answers_t, settings, margin)
    out_dir = Path(out_dir)
    for name, draw in _DRAW.items():
        save_figure(draw(agg, metrics_t, f"pair {about['pair']} on {dataset}"), out_dir / "figures", name)
    write_parquet(agg, out_dir / "aggregates.parquet")
    write_text(out_dir / "summary.md", summary_markdown(agg, answers_t, metrics_t, about, dataset, margin))
    ttft = ttft_aggregate(answers_t, pd.read_parquet(timing["ttft.parquet"]), settings)
    write_parquet(ttft, out_dir / "ttft_aggregates.parquet")
    write_text(out_dir / "timing.md", timing_markdown(ttft, agg, pd.read_parquet(timing["timings.parquet"]),
                                                      read_json(Path(timing["timings.json"])), about, dataset,
                                                      settings.ttft.target))

"""Report of the projection stage, from its tables alone: aggregates, figures and summary.

Reads answers, projector metrics and timings Parquet and facts.json (written by the stage's compute
rule); the numbers come from kvpipe.projection.aggregate, the figures from kvpipe.projection.figures,
the text from kvpipe.projection.summary. The workflow imports FIGURES when it builds the DAG, so
matplotlib is imported only inside the drawing functions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvpipe.io import read_json, write_parquet, write_text
from kvpipe.projection import figures
from kvpipe.projection.aggregate import aggregate
from kvpipe.projection.summary import summary_markdown
from kvpipe.reporting import save_figure

_DRAW = {"f1_vs_bytes": figures.f1_vs_bytes, "f1_by_condition": figures.f1_by_condition,
         "r2_by_layer": figures.r2_by_layer}
FIGURES = tuple(_DRAW)


def write_report(answers: Path, metrics: Path, timings: Path, facts: Path, dataset: str, out_dir: Path) -> None:
    """aggregates.parquet, summary.md and figures/{FIGURES}.png|pdf under out_dir, from the stage's tables."""
    frames = {name: pd.read_parquet(path) for name, path in (("answers", answers), ("metrics", metrics),
                                                               ("timings", timings))}
    about = read_json(Path(facts))
    agg = aggregate(frames["answers"], about["projection"])
    out_dir = Path(out_dir)
    for name, draw in _DRAW.items():
        save_figure(draw(agg, frames["metrics"], f"pair {about['pair']} on {dataset}"), out_dir / "figures", name)
    write_parquet(agg, out_dir / "aggregates.parquet")
    write_text(out_dir / "summary.md", summary_markdown(agg, frames["answers"], frames["metrics"], about, dataset,
                                                        frames["timings"]))

"""Re-derive a recorded projection run's report with this commit's report code, without rerunning the models.

Runs recorded before timings moved to their own files hold each row's `ttft_s` in answers.parquet
and the fit times and phases in facts.json. This moves them, unchanged, into the stage's timing
files (ttft.parquet, timings.json; timings.parquet already is one); runs recorded before the hybrid
layers had their own variant columns get `bottom_layers` and `hidden_layer` (-1: none, as every row
of theirs). It then rewrites aggregates, figures, summary.md, ttft_aggregates.parquet and
timing.md with kvpipe.projection.report.write_report. A run already in the current layout is only re-reported.

    python bench/projection_rereport.py DIR DATASET
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kvpipe.io import read_json, write_json, write_parquet
from kvpipe.projection import STAGE
from kvpipe.projection.aggregate import VARIANT
from kvpipe.projection.report import write_report


def split_timings(run: Path) -> None:
    """Move measured seconds out of answers.parquet and facts.json into the timing files."""
    answers, facts = pd.read_parquet(run / "answers.parquet"), read_json(run / "facts.json")
    if "ttft_s" in answers:
        timed = answers[answers["ttft_s"].notna()]
        write_parquet(timed[["sample_idx", *VARIANT, "ttft_s"]].reset_index(drop=True), run / "ttft.parquet")
        write_parquet(answers.drop(columns=["ttft_s"]), run / "answers.parquet")
    if "phases" in facts:
        fit_s = {name: p.pop("fit_s") for name, p in facts["projectors"].items()}
        write_json(run / "timings.json", {"phases": facts.pop("phases"), "fit_s": fit_s})
        write_json(run / "facts.json", facts)


def add_variant_columns(run: Path) -> None:
    """Give the answers and TTFT tables of an older run the variant columns it lacks (-1: none)."""
    for name in ("answers.parquet", "ttft.parquet"):
        table = pd.read_parquet(run / name)
        missing = [c for c in VARIANT if c not in table]
        if missing:
            write_parquet(table.assign(**dict.fromkeys(missing, -1)), run / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("dataset")
    args = ap.parse_args()
    split_timings(args.dir)
    add_variant_columns(args.dir)
    write_report(args.dir / "answers.parquet", args.dir / "projector_metrics.parquet", args.dir / "facts.json",
                 {name: args.dir / name for name in STAGE.timing}, args.dataset, args.dir)
    print(f"re-reported {args.dir}")


if __name__ == "__main__":
    main()

"""Re-derive a recorded selection run's report with this commit's report code, without rerunning the models.

The selection stage's model outputs do not depend on the passage ids; the current stage also
writes each row's `passage` (every interval resamples passages) and `n_sampled` in facts.json.
This joins `passage` from the sample table the run answered (checking every sample id), fills
`n_sampled` / `selection.max_samples` as the run had them (all samples, no cap), and rewrites
aggregates, figures and summary with kvpipe.selection.report.write_report.

    python bench/selection_rereport.py DIR SAMPLES.parquet DATASET
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from kvpipe.io import write_json, write_parquet
from kvpipe.selection.report import write_report


def with_passage(table: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """table with the passage of each row's sample (ids checked against the sample table)."""
    by_idx = samples.set_index("sample_idx")
    if "sample_id" in table and not (table["sample_id"].to_numpy() == by_idx.loc[table["sample_idx"], "id"].to_numpy()).all():
        raise SystemExit("the sample table does not match the run's sample ids")
    return table.drop(columns=["passage"], errors="ignore").assign(passage=by_idx.loc[table["sample_idx"], "passage"].to_numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("samples", type=Path)
    ap.add_argument("dataset")
    args = ap.parse_args()
    samples = pd.read_parquet(args.samples)
    for name in ("answers", "overlap"):
        path = args.dir / f"{name}.parquet"
        write_parquet(with_passage(pd.read_parquet(path), samples), path)
    facts = json.loads((args.dir / "facts.json").read_text())
    facts.setdefault("n_sampled", facts["n_samples"])
    facts["selection"].setdefault("max_samples", None)
    write_json(args.dir / "facts.json", facts)
    write_report(args.dir / "answers.parquet", args.dir / "overlap.parquet", args.dir / "facts.json",
                 {"timings.parquet": args.dir / "timings.parquet"}, args.dataset, args.dir)
    print(f"rewrote the report in {args.dir}")


if __name__ == "__main__":
    main()

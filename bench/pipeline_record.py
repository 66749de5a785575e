"""Record a whole Snakemake run: every stage summary and every job's Snakemake benchmark file.

    python bench/pipeline_record.py synthetic                       # the default config -> results/pipeline_synthetic/
    python bench/pipeline_record.py squad_v2 --squad PATH [--stages structure selection]
                                                                    # config/squad_v2.yaml -> results/pipeline_squad_v2/

The SQuAD run points the overlay's dataset at the official JSON through a temporary overlay
(no committed config names a path outside the repository). Runs `snakemake --cores 2` for the
chosen stages' summaries, then copies `results/{stage}/{dataset}/{pair}/summary.md` (and
`aggregates.parquet` where a stage writes one) and `results/benchmarks/**/*{dataset}*.tsv`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("structure", "selection", "projection")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["synthetic", "squad_v2"])
    ap.add_argument("--squad", type=Path, help="official SQuAD v2 dev JSON (squad_v2 only)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--pair", default="qwen-0.5b-1.5b")
    ap.add_argument("--cores", default="2")
    args = ap.parse_args()
    out = Path("bench/results") / f"pipeline_{args.dataset}"
    with tempfile.TemporaryDirectory() as tmp:
        configs = []
        if args.dataset == "squad_v2":
            overlay = Path(tmp) / "squad_path.yaml"
            overlay.write_text(f"datasets:\n  squad_v2: {{path: {str(args.squad.resolve())!r}}}\n")
            configs = ["--configfile", "config/squad_v2.yaml", str(overlay)]
        targets = [f"results/{stage}/{args.dataset}/{args.pair}/summary.md" for stage in args.stages]
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", args.cores, *targets, *configs], check=True)
    out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        stage_dir = Path("results") / stage / args.dataset / args.pair
        shutil.copy2(stage_dir / "summary.md", out / f"{stage}_summary.md")
        if (stage_dir / "aggregates.parquet").exists():
            shutil.copy2(stage_dir / "aggregates.parquet", out / f"{stage}_aggregates.parquet")
    for tsv in Path("results/benchmarks").rglob("*.tsv"):
        parts = tsv.relative_to("results/benchmarks").with_suffix("").parts
        if args.dataset in parts or parts[0] == "materialize_model":
            shutil.copy2(tsv, out / ("benchmark__" + "__".join(parts) + ".tsv"))
    print(f"recorded {out}")


if __name__ == "__main__":
    main()

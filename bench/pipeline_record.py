"""Record a whole Snakemake run: every stage summary and every job's Snakemake benchmark file.

    python bench/pipeline_record.py synthetic                       # the default config -> results/pipeline_synthetic/
    python bench/pipeline_record.py squad_v2 --squad PATH [--stages structure selection]
                                                                    # config/squad_v2.yaml -> results/pipeline_squad_v2/
    python bench/pipeline_record.py multihop                        # config/cross_family.yaml -> results/pipeline_multihop/
    python bench/pipeline_record.py multihop_bridge                 # its bridge set -> results/pipeline_multihop_bridge/

The SQuAD run points the overlay's dataset at the official JSON through a temporary overlay
(no committed config names a path outside the repository). Runs `snakemake --cores 2` for the
chosen stages' summaries of every pair (the multihop run: the overlay's pairs and stages, and the
cross-pair summary), then copies `results/{stage}/{dataset}/{pair}/summary.md` (and
`aggregates.parquet` where a stage writes one), `results/pairs/{dataset}/` and
`results/benchmarks/**/*{dataset}*.tsv`, and writes `run.json` with the whole run's wall time.
`--copy-only` records a run already made in this checkout (its job files, no wall time).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import RECORDS, write_record

from kvpipe import layout

STAGES = ("structure", "selection", "projection")
OVERLAYS = {"squad_v2": "config/squad_v2.yaml", "multihop": "config/cross_family.yaml",
            "multihop_bridge": "config/cross_family.yaml"}
CROSS_FAMILY = ["qwen-0.5b-1.5b", "smollm-qwen", "qwen-smollm", "gemma-qwen", "qwen-gemma"]
PAIRS = {"multihop": CROSS_FAMILY, "multihop_bridge": CROSS_FAMILY}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["synthetic", "squad_v2", "multihop", "multihop_bridge"])
    ap.add_argument("--squad", type=Path, help="official SQuAD v2 dev JSON (squad_v2 only)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, help="default: all three (multihop: structure selection)")
    ap.add_argument("--pairs", nargs="+", help="default: qwen-0.5b-1.5b (multihop: the overlay's five)")
    ap.add_argument("--cores", default="2")
    ap.add_argument("--copy-only", action="store_true", help="record the finished run without running Snakemake")
    args = ap.parse_args()
    stages = args.stages or (["structure", "selection"] if args.dataset in PAIRS else list(STAGES))
    pairs = args.pairs or PAIRS.get(args.dataset, ["qwen-0.5b-1.5b"])
    out = RECORDS / f"pipeline_{args.dataset}"
    with tempfile.TemporaryDirectory() as tmp:
        configs = ["--configfile", OVERLAYS[args.dataset]] if args.dataset in OVERLAYS else []
        if args.dataset == "squad_v2":
            overlay = Path(tmp) / "squad_path.yaml"
            overlay.write_text(f"datasets:\n  squad_v2: {{path: {str(args.squad.resolve())!r}}}\n")
            configs.append(str(overlay))
        targets = [str(layout.stage_dir(stage, args.dataset, pair) / "summary.md") for stage in stages for pair in pairs]
        if len(pairs) > 1:
            targets.append(str(layout.pairs_dir(args.dataset) / "summary.md"))
        if not args.copy_only:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "snakemake", "--cores", args.cores, *targets, *configs], check=True)
            wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    if not args.copy_only:
        run = {"dataset": args.dataset, "stages": stages, "pairs": pairs, "cores": int(args.cores),
               "wall_s": round(wall, 1)}
        write_record(out / "run.json", run)
    for stage in stages:
        for pair in pairs:
            stage_dir = layout.stage_dir(stage, args.dataset, pair)
            prefix = stage if len(pairs) == 1 else f"{stage}_{pair}"
            shutil.copy2(stage_dir / "summary.md", out / f"{prefix}_summary.md")
            if (stage_dir / "aggregates.parquet").exists():
                shutil.copy2(stage_dir / "aggregates.parquet", out / f"{prefix}_aggregates.parquet")
    if len(pairs) > 1:
        for name in ("summary.md", "pairs.parquet"):
            shutil.copy2(layout.pairs_dir(args.dataset) / name, out / f"pairs_{name}")
    for tsv in layout.benchmarks_dir().rglob("*.tsv"):
        parts = tsv.relative_to(layout.benchmarks_dir()).with_suffix("").parts
        if args.dataset in parts or parts[0] == "materialize_model":
            shutil.copy2(tsv, out / ("benchmark__" + "__".join(parts) + ".tsv"))
    print(f"recorded {out}")


if __name__ == "__main__":
    main()

"""Cost of the selection stage with the default pair and grid on SQuAD v2.

Samples n SQuAD questions with the production sampler (sampling settings of
config/squad_v2.yaml, the official-format JSON given by --squad), runs the whole stage (kvpipe.selection.stage.run_selection) and
records its wall time, plus the per-condition overhead beyond each condition's own question
forward and decode steps: (cache copy + pruning + selection scoring) per condition, divided
by the model's context prefill time (target: at most 0.10). Writes bench/results/selection.json
and leaves the stage's outputs in bench/results/selection_squad/.

    python bench/selection_bench.py --squad data/squad_v2/dev-v2.0.json [--n 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
from benchkit import RECORDS, TARGETS, stage_report, write_record

from kvpipe import layout
from kvpipe.config import load_config, pair_settings
from kvpipe.data.sampling import sample_to_file
from kvpipe.selection.stage import run_selection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--squad", type=Path, default=Path("data/squad_v2/dev-v2.0.json"), help="official SQuAD v2 JSON")
    ap.add_argument("--results", type=Path, default=layout.RESULTS)
    ap.add_argument("--out", type=Path, default=RECORDS / "selection.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(["config.yaml", "config/squad_v2.yaml"])
    pair = config["run"]["pairs"][0]
    scout, main_ = (layout.model_dir(config["pairs"][pair][r], args.results) for r in ("scout", "main"))
    out_dir = args.out.parent / "selection_squad"
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.parquet"
        sample_to_file("squad_v2", config["datasets"]["squad_v2"] | {"path": str(args.squad)},
                       layout.model_dir(config["sampling"]["tokenizer"], args.results), config["prompt"],
                       config["sampling"] | {"n": args.n}, samples)
        start = time.perf_counter()
        run_selection(scout, main_, samples, pair, pair_settings(config, pair, "selection"), config["prompt"], "cpu",
                      config["extraction"]["dtype"], out_dir)
        wall = time.perf_counter() - start
        stage_report("selection", out_dir, "squad_v2")
    timings = pd.read_parquet(out_dir / "timings.parquet")
    n_cond = timings["pruned_conditions"] + 1                     # pruned batch + the full-KV condition
    per_condition = (timings["prune_copy_s"] + timings["scoring_s"]) / n_cond
    timings["overhead_ratio"] = per_condition / timings["prefill_s"]
    by_role = timings.groupby("model").agg(prefill_s=("prefill_s", "median"), full_answer_s=("full_answer_s", "median"),
                                           pruned_batch_s=("pruned_answers_s", "median"),
                                           prune_copy_s=("prune_copy_s", "median"), scoring_s=("scoring_s", "median"),
                                           overhead_ratio_median=("overhead_ratio", "median"),
                                           overhead_ratio_max=("overhead_ratio", "max"))
    wall_target, overhead = TARGETS["selection_wall_s"], TARGETS["selection_overhead_ratio"]
    record = {"dataset": "squad_v2", "n_samples": args.n, "pair": pair, "grid": config["selection"]["retention"],
              "methods": config["selection"]["methods"], "max_new_tokens": config["selection"]["max_new_tokens"],
              "stage_wall_s": round(wall, 1), "target_wall_s": wall_target.bound, "meets_wall_target": wall_target.met(wall),
              "per_model": by_role.round(4).to_dict(orient="index"), "target_overhead_ratio": overhead.bound,
              "meets_overhead_target": bool(timings["overhead_ratio"].map(overhead.met).all())}
    write_record(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""Peak memory of the selection stage and of the whole projection stage at 1x and 4x samples: neither may grow with n.

Uses structure_bench.py's scaled random pair (the default pair's KV shapes, 8 layers, one shared
tokenizer): n and 4n synthetic samples, both models' KV extracted with the production code, then
each stage as the pipeline runs it (`run_selection` over every sample with the default grid;
`run_projection` with the default settings: every projector and objective, every condition) in a
fresh child process. Recorded per run: peak RSS, the RSS the child held before the stage
(interpreter, torch, kvpipe) and the wall time. Writes bench/results/stage_memory.json.

    python bench/stage_memory_bench.py [--n 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from structure_bench import in_child, peak_rss_mb, scaled_pair

from kvpipe.config import load_config


def _selection(scout: Path, main: Path, samples: Path, cfg: dict, prompt: dict, out: Path) -> dict:
    from kvpipe.selection.stage import run_selection

    before, start = peak_rss_mb(), time.perf_counter()
    run_selection(scout, main, samples, "bench", cfg, prompt, "cpu", "float32", out)
    return {"seconds": round(time.perf_counter() - start, 1), "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def _projection(kv: dict[str, Path], models: dict[str, Path], samples: Path, cfg: dict, prompt: dict, out: Path) -> dict:
    from kvpipe.projection.stage import run_projection

    before, start = peak_rss_mb(), time.perf_counter()
    run_projection(kv["scout"], kv["main"], samples, models["scout"], models["main"], "bench", cfg, prompt, "cpu",
                   "float32", out)
    return {"seconds": round(time.perf_counter() - start, 1), "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results/stage_memory.json"))
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    selection = config["selection"] | {"max_samples": None}
    record: dict = {"n": args.n, "selection": {}, "projection": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for factor in (1, 4):
            models, samples, kv = scaled_pair(root, args.n * factor, config)
            run = f"{factor}x"
            record["selection"][run] = in_child(_selection, models["scout"], models["main"], samples, selection,
                                                config["prompt"], root / f"selection{factor}") | {"n_samples": args.n * factor}
            record["projection"][run] = in_child(_projection, kv, models, samples, config["projection"], config["prompt"],
                                                 root / f"projection{factor}") | {"n_samples": args.n * factor}
            print(run, record["selection"][run], record["projection"][run], flush=True)
    for stage in ("selection", "projection"):
        runs = record[stage]
        record[stage]["rss_ratio_4x_over_1x"] = round(runs["4x"]["peak_rss_mb"] / runs["1x"]["peak_rss_mb"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark KV extraction against a bare forward pass over the same prompts.

Needs the default pipeline's models and samples (run `snakemake --cores 2` first).
For each model of the default pair: time bare prefills (the same call extraction makes,
without storing anything), then `kvpipe.kv.extract.extract` into a temporary directory,
then bare prefills again; the ratio divides extraction time by the mean bare time.
Writes a JSON record (default bench/results/extract.json).

    python bench/extract_bench.py [--n 20] [--out bench/results/extract.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from benchkit import RECORDS, TARGETS, write_record

from kvpipe import layout
from kvpipe.config import load_config, run_models
from kvpipe.data.prompt import build_prompt
from kvpipe.io import read_json
from kvpipe.kv import store as kvstore
from kvpipe.kv.extract import extract, forward
from kvpipe.models.load import load_model


def bare_seconds(lm, prompts) -> float:
    start = time.perf_counter()
    for tokens in prompts:
        forward(lm, tokens.input_ids)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--results", type=Path, default=layout.RESULTS)
    ap.add_argument("--out", type=Path, default=RECORDS / "extract.json")
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    dataset = config["run"]["datasets"][0]
    samples_path = layout.samples_file(dataset, args.results)
    samples = pd.read_parquet(samples_path).head(args.n)
    record = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
              "dataset": dataset, "n_samples": len(samples), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "samples.parquet"
        samples.to_parquet(subset, index=False)
        for slug in run_models(config):
            model_dir = layout.model_dir(slug, args.results)
            lm = load_model(model_dir, "cpu", config["extraction"]["dtype"])
            prompts = [build_prompt(lm.tokenizer, config["prompt"], r.context, r.question) for r in samples.itertuples()]
            forward(lm, prompts[0].input_ids)  # warm-up
            before = bare_seconds(lm, prompts)
            manifest = extract(model_dir, subset, Path(tmp) / slug, config["extraction"], config["prompt"], "cpu", dataset)
            seconds = read_json(Path(tmp) / slug / kvstore.TIMINGS)["seconds_this_run"]
            after = bare_seconds(lm, prompts)
            bare = (before + after) / 2
            rows = manifest["rows_per_layer"] * len(manifest["layers"])
            storage_bytes = 2 if manifest["storage_dtype"] == "float16" else 4
            record["models"][slug] = {
                "tokens": manifest["rows_per_layer"], "layers": len(manifest["layers"]), "width": manifest["width"],
                "bare_forward_s": round(bare, 2), "bare_forward_runs_s": [round(before, 2), round(after, 2)],
                "extraction_s": seconds,
                "ratio_extraction_over_bare": round(seconds / bare, 3),
                "rows_per_s": round(rows / seconds),
                "stored_bytes_per_token_layer": round(manifest["bytes"] / rows, 1),
                "raw_kv_bytes_per_token_layer_fp32": 2 * manifest["width"] * 4,
                "raw_stored_tensors_bytes_per_token_layer": 3 * manifest["width"] * storage_bytes,
                "storage_dtype": manifest["storage_dtype"], "compression": config["extraction"]["compression"],
            }
            print(slug, record["models"][slug], flush=True)
            del lm
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    target = TARGETS["extraction_over_bare"]
    record["target_ratio"] = target.bound
    record["meets_target"] = all(target.met(m["ratio_extraction_over_bare"]) for m in record["models"].values())
    write_record(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

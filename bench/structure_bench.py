"""Peak memory of KV extraction and of the structure stage at 1x and 4x samples: neither may grow with n.

Builds two random-initialised Qwen2 models with the default pair's KV shapes scaled down in
depth (scout 8 layers x 2 KV heads x 64, main 8 layers x 2 x 128, one shared tokenizer),
extracts n and 4n synthetic samples with the production code, each extraction and each
structure run in a fresh child process, and records peak RSS and wall time.
Writes bench/results/structure.json.

    python bench/structure_bench.py [--n 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchkit import MAIN, RECORDS, SCOUT, in_child, peak_rss_mb, scaled_samples, write_record

from kvpipe.config import load_config
from kvpipe.kv.extract import extract
from kvpipe.kv.pairs import read_passages
from kvpipe.models.materialize import materialize


def _extract(*args) -> dict:
    start = time.perf_counter()
    manifest = extract(*args)
    return {"rows_per_layer": manifest["rows_per_layer"], "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": peak_rss_mb()}


def _structure(*args) -> dict:
    from kvpipe.structure.stage import analyse_pair

    start = time.perf_counter()
    table, facts = analyse_pair(*args)
    return {"rows": len(table), "test_tokens": facts["n_test_tokens"], "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RECORDS / "structure.json")
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    extraction = config["extraction"] | {"dtype": "float32"}
    record = {"scout": SCOUT, "main": MAIN, "structure": config["structure"], "shard_size": extraction["shard_size"],
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = {name: root / name for name in ("scout", "main")}
        materialize("scout", SCOUT, dirs["scout"])
        materialize("main", MAIN, dirs["main"])
        for factor in (1, 4):
            n = args.n * factor
            samples = scaled_samples(dirs, n, config, root / f"samples{n}.parquet")
            kv = {role: root / f"kv{n}" / role for role in dirs}
            extraction_runs = {role: in_child(_extract, dirs[role], samples, kv[role], extraction, config["prompt"], "cpu")
                               for role in dirs}
            result = in_child(_structure, kv["scout"], kv["main"], read_passages(samples, kv["main"]), "bench",
                               config["structure"])
            kv_mb = sum(f.stat().st_size for f in kv["main"].rglob("*.parquet")) / 2**20
            record["runs"][f"{factor}x"] = result | {"n_samples": n, "main_kv_mb_on_disk": round(kv_mb, 1),
                                                     "extract_main": extraction_runs["main"]}
            print(factor, record["runs"][f"{factor}x"], flush=True)
    one, four = record["runs"]["1x"], record["runs"]["4x"]
    record["rss_ratio_4x_over_1x"] = round(four["peak_rss_mb"] / one["peak_rss_mb"], 3)
    record["extract_rss_ratio_4x_over_1x"] = round(four["extract_main"]["peak_rss_mb"] / one["extract_main"]["peak_rss_mb"], 3)
    write_record(args.out, record)
    print(args.out.read_text())


if __name__ == "__main__":
    main()

"""One model job under Snakemake against the same work run directly: does the job get the machine's cores?

    python bench/threads_bench.py [--n 12] [--model qwen2.5-coder-0.5b]     # -> results/threads.json

Snakemake starts every job with OMP_NUM_THREADS / MKL_NUM_THREADS set to the job's threads; a
rule that declared none ran torch on one core. Here the extraction job of one offline model
runs through `snakemake --cores N` in a scratch working directory (its materialised model linked
from results/models, a synthetic set of `--n` samples), and its wall time (Snakemake's benchmark
file) is compared with `kvpipe extract` on the same sample table in this process's environment.
Target: Snakemake / direct ≤ 1.1. The job's log states the torch thread count it ran with.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import RECORDS, REPO, TARGETS, write_record

from kvpipe import layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="synthetic samples")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a model of config.yaml, materialised in results/models")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=RECORDS / "threads.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results, model = work / layout.RESULTS, work / layout.model_dir(args.model)
        model.parent.mkdir(parents=True)
        model.symlink_to((REPO / layout.model_dir(args.model)).resolve())
        overlay = work / "bench.yaml"
        overlay.write_text(f"datasets: {{threadsbench: {{source: synthetic, seed: 0, passages: {args.n}}}}}\n"
                           f"sampling: {{n: {args.n}, tokenizer: {args.model}}}\n")
        manifest = str(layout.kv_dir("threadsbench", args.model) / "manifest.json")
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                        "--cores", str(args.cores), manifest, "--configfile", str(REPO / "config.yaml"), str(overlay)],
                       check=True)
        chunks = sorted(layout.benchmark_file("extract_kv_chunk", "threadsbench", args.model, "x", root=results)
                        .parent.glob("*.tsv"))   # one per chunk of samples (run.chunk_size)
        snakemake_s = 0.0
        for chunk in chunks:
            with open(chunk) as f:
                snakemake_s += float(next(csv.DictReader(f, delimiter="\t"))["s"])
        log = layout.log_file("extract_kv_chunk", "threadsbench", args.model, chunks[0].stem, root=results).read_text()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kvpipe.cli", "extract", "--model-dir", str(model),
                        "--samples", str(layout.samples_file("threadsbench", results)), "--out",
                        str(work / "direct"), "-c", str(REPO / "config.yaml"), "-c", str(overlay)], check=True, cwd=REPO)
        direct_s = time.perf_counter() - started
    ratio, target = snakemake_s / direct_s, TARGETS["snakemake_over_direct"]
    record = {"model": args.model, "n_samples": args.n, "cores": args.cores,
              "job_torch_threads": next(line for line in log.splitlines() if line.startswith("torch threads")),
              "snakemake_job_s": round(snakemake_s, 2), "direct_s": round(direct_s, 2),
              "ratio_snakemake_over_direct": round(ratio, 3), "target": target.bound,
              "meets_target": target.met(ratio)}
    write_record(args.out, record)
    print(record)


if __name__ == "__main__":
    main()

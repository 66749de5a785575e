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
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

from kvpipe.config import load_config
from kvpipe.data.sampling import sample_to_file
from kvpipe.kv.extract import extract
from kvpipe.kv.pairs import read_passages
from kvpipe.models.materialize import materialize

SCOUT = {"source": "tiny", "arch": "qwen2", "layers": 8, "hidden_size": 256, "heads": 8, "kv_heads": 2,
         "intermediate_size": 512, "vocab_size": 512, "tokenizer_seed": 0, "seed": 1}
MAIN = SCOUT | {"hidden_size": 512, "heads": 8, "intermediate_size": 1024, "seed": 2}


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


def scaled_pair(root: Path, n: int, config: dict) -> tuple[dict[str, Path], Path, dict[str, Path]]:
    """The scaled random pair under root (materialised once), n synthetic samples and both models' KV of them:
    (model dirs, samples file, KV dirs) by role."""
    models = {"scout": root / "scout", "main": root / "main"}
    for role, spec in (("scout", SCOUT), ("main", MAIN)):
        if not models[role].exists():
            materialize(role, spec, models[role])
    samples = root / f"samples{n}.parquet"
    dataset = {"source": "synthetic", "seed": 0, "passages": n, "entities_per_passage": 2, "unanswerable_fraction": 0.0}
    sampling = {"n": n, "seed": 0, "answerable_only": True, "tokenizer": "scout", "max_context_tokens": 4096}
    sample_to_file("bench", dataset, models["scout"], config["prompt"], sampling, samples)
    kv = {role: root / f"kv{n}" / role for role in models}
    for role in models:
        extract(models[role], samples, kv[role], config["extraction"] | {"dtype": "float32"}, config["prompt"], "cpu")
    return models, samples, kv


def peak_rss_mb() -> int:
    """This process's own peak resident memory in MB.

    Linux's VmHWM, not getrusage's ru_maxrss: a spawned child's ru_maxrss keeps the high-water mark of
    the parent it was forked from (it survives exec), so it would report at least the parent's size.
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2))


def _call(func, args: tuple, queue: mp.Queue) -> None:
    queue.put(func(*args))


def in_child(func, *args) -> dict:
    """func(*args) in a fresh spawned process (so the peak RSS it reports is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(func, args, queue))
    proc.start()
    while True:   # a child that dies (an exception, the OOM killer) never puts a result: say so, do not wait forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{func.__name__} died in its child process (exit code {proc.exitcode})") from None
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/results/structure.json"))
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
            samples = root / f"samples{n}.parquet"
            dataset = {"source": "synthetic", "seed": 0, "passages": n, "entities_per_passage": 2,
                       "unanswerable_fraction": 0.0}
            sampling = {"n": n, "seed": 0, "answerable_only": True, "tokenizer": "scout", "max_context_tokens": 4096}
            sample_to_file("bench", dataset, dirs["scout"], config["prompt"], sampling, samples)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""The projection stage on the default pair: every condition's F1 with CI, bytes, TTFT ratio, fit time, peak RSS.

For the synthetic set (config.yaml) and for n SQuAD v2 dev questions (config/squad_v2.yaml with the
official JSON given by --squad, unanswerable questions included), samples, extracts both models' KV
(reusing verified shards of an earlier run under --work) and runs the whole stage
(kvpipe.projection.stage.run_projection) in a child process that records its peak RSS; the report's
tables and summary are copied to bench/results/projection_{dataset}/. A second part fits every
projector (reconstruction; the attention objective uses a fixed number of prompts) on n and 4n
samples of two random-initialised models with the default pair's widths (benchkit's scaled pair)
and records the peak RSS of each fit: it may not grow with the number of samples.
Writes bench/results/projection.json.

    python bench/projection_bench.py --squad data/squad_v2/dev-v2.0.json [--n 50] [--memory-n 24]
    # answerable questions only, the conditions of bench/overlays/projection_answerable.yaml:
    python bench/projection_bench.py --only squad_v2 --squad ... --n 140 \
        --overlay bench/overlays/projection_answerable.yaml --name answerable
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from benchkit import RECORDS, TARGETS, in_child, peak_rss_mb, scaled_pair, stage_report, write_record

from kvpipe import layout
from kvpipe.config import load_config, pair_settings
from kvpipe.data.sampling import sample_to_file
from kvpipe.kv.extract import extract
from kvpipe.kv.pairs import read_passages
from kvpipe.projection.aggregate import VARIANT

KEEP = ("answers.parquet", "aggregates.parquet", "projector_metrics.parquet", "facts.json", "summary.md",
        "ttft.parquet", "timings.parquet", "timings.json", "ttft_aggregates.parquet", "timing.md")


def _stage(*args: object) -> dict:
    from kvpipe.projection.stage import run_projection

    start = time.perf_counter()
    run_projection(*args)
    out = Path(args[10])
    wall = time.perf_counter() - start
    rss = peak_rss_mb()
    stage_report("projection", out, out.parent.name)
    return {"stage_wall_s": round(wall, 1), "peak_rss_mb": rss}


def _fit(scout_kv: Path, main_kv: Path, samples: Path, section: dict) -> dict:
    from kvpipe.projection.calibration import Calibration
    from kvpipe.projection.fit import fit_all, kinds_of
    from kvpipe.projection.layer_map import relative_depth
    from kvpipe.settings import ProjectionSettings, from_section

    start = time.perf_counter()
    cfg = from_section(ProjectionSettings, section | {"objectives": ["reconstruction"]})
    cal = Calibration.open(scout_kv, main_kv, read_passages(samples, main_kv), "bench", relative_depth(8, 8),
                           tuple(dict.fromkeys(k for p in cfg.projectors for k in kinds_of(p, cfg))), cfg)
    fitted = fit_all(cal, cal.statistics(), cfg, None, None)
    return {"fit_s": round(time.perf_counter() - start, 1), "projectors": len(fitted),
            "peak_rss_mb": peak_rss_mb()}


def one_dataset(name: str, config: dict, n: int, work: Path, out: Path, ttft_samples: int | None = None,
                label: str = "") -> dict:
    """Sample, extract both models, run the stage; copy its report under out (projection_{name}[_{label}]); return
    the record."""
    pair = config["run"]["pairs"][0]
    models = {role: layout.model_dir(config["pairs"][pair][role]) for role in ("scout", "main")}
    tag = "_".join(filter(None, (name, label)))
    root = work / tag
    samples = root / "samples.parquet"
    sample_to_file(name, config["datasets"][name], layout.model_dir(config["sampling"]["tokenizer"]),
                   config["prompt"], config["sampling"] | {"n": n}, samples)
    kv = {role: root / "kv" / models[role].name for role in models}
    for role in models:
        extract(models[role], samples, kv[role], config["extraction"], config["prompt"], "cpu", name)
    stage_out = root / "projection"
    cfg = pair_settings(config, pair, "projection")
    if ttft_samples is not None:
        cfg["ttft_samples"] = ttft_samples
    run = in_child(_stage, kv["scout"], kv["main"], samples, models["scout"], models["main"], pair, cfg,
                   config["prompt"], "cpu", config["extraction"]["dtype"], stage_out)
    dest = out / f"projection_{tag}"
    dest.mkdir(parents=True, exist_ok=True)
    for file in KEEP:
        shutil.copy2(stage_out / file, dest / file)
    shutil.copytree(stage_out / "figures", dest / "figures", dirs_exist_ok=True)
    facts = json.loads((stage_out / "facts.json").read_text())
    timing = json.loads((stage_out / "timings.json").read_text())
    variant = list(VARIANT)
    agg = pd.read_parquet(stage_out / "aggregates.parquet").merge(
        pd.read_parquet(stage_out / "ttft_aggregates.parquet").drop(columns=["n"]), on=variant, how="left")
    cols = [*variant, "n", "f1", "f1_low", "f1_high", "delta_f1", "delta_f1_low", "delta_f1_high", "p_holm", "bytes",
            "bytes_ratio", "ttft_s", "ttft_ratio", "ttft_ratio_low", "ttft_ratio_high"]
    injected = agg[agg["condition"].isin(["projected_kv", "mean_kv", "chain"])]
    phases = timing["phases"]
    return run | {"n_samples": n, "n_test_samples": facts["n_test_samples"], "n_test_passages": facts["n_test_passages"],
                  "phases_s": phases, "fit_total_s": round(phases["statistics_s"] + phases["attention_data_s"]
                                                           + phases["fit_s"], 1),
                  "projectors": {k: {"fit_s": timing["fit_s"][k]} | {f: v[f] for f in ("params", "bytes", "validation_error")}
                                 for k, v in facts["projectors"].items()},
                  "max_ttft_ratio_injected": round(float(injected["ttft_ratio"].max()), 3),
                  "conditions": agg[cols].round(4).to_dict(orient="records")}


def memory(n: int, config: dict) -> dict:
    """Peak RSS of fitting every projector on n and 4n samples of scaled random models."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 4):
            _, samples, kv = scaled_pair(Path(tmp), n * factor, config)
            fit = in_child(_fit, kv["scout"], kv["main"], samples, config["projection"])
            runs[f"{factor}x"] = fit | {"n_samples": n * factor}
            print(factor, runs[f"{factor}x"], flush=True)
    ratio, target = runs["4x"]["peak_rss_mb"] / runs["1x"]["peak_rss_mb"], TARGETS["rss_ratio_4x_over_1x"]
    return {"runs": runs, "rss_ratio_4x_over_1x": round(ratio, 3), "target": target.bound, "meets_target": target.met(ratio)}


def _key(dataset: str, name: str) -> str:
    return "_".join(filter(None, (dataset, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, default=Path("data/squad_v2/dev-v2.0.json"), help="official SQuAD v2 JSON")
    ap.add_argument("--n", type=int, default=50, help="SQuAD questions")
    ap.add_argument("--memory-n", type=int, default=24)
    ap.add_argument("--work", type=Path, default=layout.RESULTS / "bench" / "projection")
    ap.add_argument("--out", type=Path, default=RECORDS / "projection.json")
    ap.add_argument("--only", choices=["synthetic", "squad_v2", "memory"], action="append")
    ap.add_argument("--ttft-samples", type=int, default=None, help="override projection.ttft_samples")
    ap.add_argument("--overlay", type=Path, action="append", default=[], help="config overlay(s) merged last")
    ap.add_argument("--name", default="", help="a variant's name: its record key and report folder get _NAME")
    args = ap.parse_args()
    only = set(args.only or ["synthetic", "squad_v2", "memory"])
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    record |= {"targets": {"ttft_ratio_injected": TARGETS["ttft_ratio_injected"].bound,
                           "fit_total_s_50_samples": TARGETS["projection_fit_total_s"].bound,
                           "rss_ratio_4x_over_1x": TARGETS["rss_ratio_4x_over_1x"].bound}}
    if "synthetic" in only:
        config = load_config(["config.yaml", *args.overlay])
        record[_key("synthetic", args.name)] = one_dataset("synthetic", config, config["sampling"]["n"], args.work,
                                                           args.out.parent, args.ttft_samples, args.name)
    if "squad_v2" in only:
        config = load_config(["config.yaml", "config/squad_v2.yaml", *args.overlay])
        config["datasets"]["squad_v2"] |= {"path": str(args.squad)}
        record[_key("squad_v2", args.name)] = one_dataset("squad_v2", config, args.n, args.work, args.out.parent,
                                                          args.ttft_samples, args.name)
    if "memory" in only:
        record["memory"] = memory(args.memory_n, load_config(["config.yaml"]))
    write_record(args.out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "conditions"}, indent=2)[:4000])


if __name__ == "__main__":
    main()

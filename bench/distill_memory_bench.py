"""Peak memory of a distill fit at 1x and 4x samples: one sample's graph at a time, a top-k teacher.

On the scaled random pair of structure_bench.py (scout 8 layers x 2 KV heads x 64, main 8 x 2 x 128,
one shared tokenizer), each fit runs in a fresh child process: the production code builds the
distill samples of synthetic question prompts (the main's own answer, its top-k teacher, the
scout's payload) and trains a ridge projector for a fixed number of steps with the default
`projection.distill` settings. At 1x it holds `n` training prompts and accumulates 1 sample per
step; at 4x 4n prompts and 4 samples per step. Recorded per run: peak RSS (VmHWM) once the samples
are built and at the end of the fit, the fit's own increment, the teacher bytes the samples hold,
and what a whole-vocabulary teacher would hold at Qwen2.5's vocabulary for the same tokens.
Writes bench/results/distill_memory.json.

    python bench/distill_memory_bench.py [--n 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from structure_bench import MAIN, SCOUT, in_child, peak_rss_mb

from kvpipe.config import load_config
from kvpipe.data.prompt import build_prompt
from kvpipe.data.sampling import sample_to_file
from kvpipe.models.load import load_model
from kvpipe.models.materialize import materialize
from kvpipe.projection.distill import question_sample
from kvpipe.projection.distill_fit import FitSchedule, fit_distill
from kvpipe.projection.layer_map import relative_depth
from kvpipe.projection.registry import PROJECTORS
from kvpipe.settings import ProjectionSettings, from_section

QWEN_VOCAB = 151_936  # Qwen2.5's output vocabulary, for the whole-vocabulary teacher's size


def _fit(dirs: dict[str, Path], samples: Path, n: int, accumulate: int, steps: int, config: dict) -> dict:
    """Build n training and 2 held-out samples, then fit; peak RSS before and after the fit."""
    cfg = from_section(ProjectionSettings, config["projection"] | {"max_new_tokens": 8})
    scout, main = (load_model(dirs[role], "cpu", "float32") for role in ("scout", "main"))
    rows = list(pd.read_parquet(samples).itertuples(index=False))[: n + 2]
    data = [
        question_sample(
            scout,
            main,
            build_prompt(main.tokenizer, config["prompt"], r.context, r.question),
            tuple(r.answers),
            cfg.max_new_tokens,
            cfg.distill.teacher_top_k,
        )
        for r in rows
    ]
    built = peak_rss_mb()
    lmap = relative_depth(scout.card["num_layers"], main.card["num_layers"])
    p = scout.card["num_kv_heads"] * scout.card["head_dim"]
    q = main.card["num_kv_heads"] * main.card["head_dim"]
    projector = PROJECTORS["ridge"](len(lmap), ("key", "value"), p, q, cfg)
    with torch.no_grad():
        for kind in ("key", "value"):
            projector.weight[kind].copy_(
                0.05 * torch.randn(projector.weight[kind].shape, generator=torch.Generator().manual_seed(0))
            )
    settings = replace(FitSchedule.of(cfg), steps=steps, accumulate=accumulate, eval_every=steps, patience=steps)
    start = time.perf_counter()
    result = fit_distill(projector, data[:n], data[n:], lmap, main, settings)
    teacher = sum(s.teacher.numel() * 4 + (0 if s.teacher_ids is None else s.teacher_ids.numel() * 8) for s in data)
    targets = sum(len(s.after) for s in data)
    return {
        "train_samples": n,
        "held_out_samples": len(data) - n,
        "accumulate": accumulate,
        "steps": result["steps"],
        "fit_s": round(time.perf_counter() - start, 1),
        "tokens_seen": result["tokens_seen"],
        "peak_rss_mb_samples_built": built,
        "peak_rss_mb": peak_rss_mb(),
        "fit_increment_mb": peak_rss_mb() - built,
        "teacher_mb": round(teacher / 2**20, 3),
        "teacher_mb_whole_qwen_vocabulary": round(targets * QWEN_VOCAB * 4 / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="training prompts at 1x")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench/results/distill_memory.json"))
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    record = {"scout": SCOUT, "main": MAIN, "distill": config["projection"]["distill"], "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {role: Path(tmp) / role for role in ("scout", "main")}
        for role, spec in (("scout", SCOUT), ("main", MAIN)):
            materialize(role, spec, dirs[role])
        samples = Path(tmp) / "samples.parquet"
        n = 4 * args.n + 2
        dataset = {"source": "synthetic", "seed": 0, "passages": n, "entities_per_passage": 2, "unanswerable_fraction": 0.0}
        sampling = {"n": n, "seed": 0, "answerable_only": True, "tokenizer": "scout", "max_context_tokens": 4096}
        sample_to_file("bench", dataset, dirs["scout"], config["prompt"], sampling, samples)
        for factor in (1, 4):
            run = in_child(_fit, dirs, samples, factor * args.n, factor, args.steps, config)
            record["runs"][f"{factor}x"] = run
            print(factor, run, flush=True)
    one, four = record["runs"]["1x"], record["runs"]["4x"]
    record["rss_ratio_4x_over_1x"] = round(four["peak_rss_mb"] / one["peak_rss_mb"], 3)
    record["target"], record["meets_target"] = 1.1, record["rss_ratio_4x_over_1x"] <= 1.1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

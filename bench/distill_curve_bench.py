"""The distill objective's learning curve on a real pair, at a small step budget (CPU) or a larger one (CUDA).

With the production code: the pair's calibration split of a recorded KV dataset, the ridge
reconstruction fit, then the ridge distill fit from it on seeded calibration prompts (training folds;
early stopping and the curve on the validation fold), the settings `projection.distill` of the
config overlays with the command line's overrides. No test passage is read. Records the card's
learning curve (training loss, validation KL, answerable F1 of the main's greedy answers from the
projected cache every `eval_every` steps), the tokens seen, the steps, the fit's time and peak memory,
and the references on the same validation prompts: the main's answerable F1 with its own cache
(main_full) and with every context token evicted (no_context).

    python bench/distill_curve_bench.py --kv results/kv/squad_v2 --samples results/data/squad_v2/samples.parquet \\
        --models results/models [--device cuda --dtype bfloat16] [--steps 60 --train 32 --held 12 --accumulate 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvpipe.config import load_config
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.kv.pairs import read_passages
from kvpipe.models.load import LoadedModel, load_model
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.distill import DistillSample
from kvpipe.projection.distill_stage import distill_data
from kvpipe.projection.fit import fit_all
from kvpipe.projection.layer_map import layer_map
from kvpipe.settings import ProjectionSettings, from_section


def references(main_lm: LoadedModel, held: list[DistillSample], max_new_tokens: int) -> dict[str, float | int | None]:
    """The main's mean answerable F1 on the validation prompts with its own cache and with no context at all."""
    rows = [AnswerRequest("main_full"), AnswerRequest("no_context", np.zeros(0, dtype=np.int64))]
    scores = []
    for sample in held:
        if sample.tokens is not None and sample.answers:
            answers = Session(main_lm, sample.tokens, 1).answer(rows, max_new_tokens)
            scores.append([score_prediction(a.text, list(sample.answers))[2] for a in answers])
    mean = np.mean(scores, axis=0) if scores else [None, None]
    return {"answerable_validation_prompts": len(scores), "main_full_f1": mean[0], "no_context_f1": mean[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", type=Path, required=True, help="results/kv/{dataset}: one KV dataset per model")
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True, help="the materialised models' folder")
    ap.add_argument("--scout", default="qwen2.5-coder-0.5b")
    ap.add_argument("--main", default="qwen2.5-coder-1.5b")
    ap.add_argument("--overlay", type=Path, default=Path("config/squad_v2.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train", type=int, default=32, help="training prompts")
    ap.add_argument("--held", type=int, default=12, help="validation prompts")
    ap.add_argument("--accumulate", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/distill_curve_squad_v2.json"))
    args = ap.parse_args()
    config = load_config(["config.yaml", args.overlay])
    distill = config["projection"]["distill"] | {
        "steps": args.steps,
        "samples": args.train,
        "held_out": args.held,
        "accumulate": args.accumulate,
        "eval_every": args.eval_every,
        "checkpoint_every": args.eval_every,
    }
    section = config["projection"] | {
        "projectors": ["ridge"],
        "objectives": ["reconstruction", "distill"],
        "post_rope_comparison": False,
        "distill": distill,
    }
    cfg = from_section(ProjectionSettings, section)
    scout, main_lm = (load_model(args.models / slug, args.device, args.dtype) for slug in (args.scout, args.main))
    lmap = layer_map(cfg.layer_map, scout.card["num_layers"], main_lm.card["num_layers"], None)
    kv = {role: args.kv / slug for role, slug in (("scout", args.scout), ("main", args.main))}
    cal = Calibration.open(kv["scout"], kv["main"], read_passages(args.samples, kv["main"]), "bench", lmap, ("key", "value"), cfg)
    started = time.perf_counter()
    stats = cal.statistics()
    data = distill_data(cal, pd.read_parquet(args.samples), scout, main_lm, config["prompt"], cfg)
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit_all(cal, stats, cfg, main_lm, None, data, Path(tmp))
    f = fitted[("ridge", "distill")]
    record = {
        "pair": {"scout": args.scout, "main": args.main},
        "device": args.device,
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "reconstruction_validation_error": fitted[("ridge", "reconstruction")].errors,
        "distill": f.card["distill"],
        "errors": f.errors,
        "fit_s": round(f.fit_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "peak_mib": round(f.peak_mib, 1),
        "references": references(main_lm, data[1], cfg.max_new_tokens),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(json.dumps(record["distill"]["learning_curve"], indent=2))


if __name__ == "__main__":
    main()

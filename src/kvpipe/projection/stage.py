"""The projection stage: fit scout -> main KV projectors, inject their caches, answer, count bytes and time.

1. Split the pair's samples into calibration and test by passage (kvpipe.splits), accumulate the
   per-(main layer, kind, fold) statistics in one streamed pass over both KV datasets, and fit each
   configured projector (kvpipe.projection.projectors) for reconstruction; for the attention
   objective, refine a copy on the main's attention outputs (kvpipe.projection.attention).
2. Score every projector per layer on the test passages (projector_metrics.parquet) and save it
   (projectors/{name}-{objective}.safetensors + .json).
3. On the test samples (with `max_test_samples`, whole test passages in sample order up to it),
   answer every condition (kvpipe.projection.conditions) with its bytes (answers.parquet) and time to
   first token (ttft.parquet). facts.json holds sizes and settings. Every time measured lives in the
   timing files (ttft.parquet, timings.parquet per sample, timings.json: phases and fit times), so that
   every other output is byte-identical between runs; kvpipe.projection.report turns the tables into
   aggregates, figures, the summary and the timing report.

Steps 1-2 are fit_projection (once per pair, on the whole sample table); step 3 is answer_chunk, one job per
chunk of samples (kvpipe.chunks), reading the fit's ANSWERING file; kvpipe.projection.gather joins the chunks.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from kvpipe.io import atomic_path, write_json, write_parquet
from kvpipe.kv.pairs import read_passages
from kvpipe.models.load import LoadedModel, load_model
from kvpipe.projection.answer import Answerer
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.conditions import Variant
from kvpipe.projection.distill_stage import distill_data
from kvpipe.projection.fit import attention_data, fit_all, kinds_of, main_means, save
from kvpipe.projection.fuser import OBJECTIVE, stage_fuser
from kvpipe.projection.gather import gather
from kvpipe.projection.hidden_distill import stage_hidden_map
from kvpipe.projection.layer_map import layer_map
from kvpipe.projection.metrics import projector_metrics
from kvpipe.projection.payload import text_bytes
from kvpipe.settings import ProjectionSettings, from_section
from kvpipe.splits import whole_passages

ANSWERING = "answering.pt"        # fit_projection -> answer_chunk: fitted projectors, means, hidden map, test samples
FIT_TIMINGS = "fit_timings.json"  # the fit's phases and times, joined with the chunks' seconds by the gather


def _facts(pair: str, cal: Calibration, cfg: ProjectionSettings, cards: dict[str, Any], samples: pd.DataFrame,
           test: pd.DataFrame) -> dict[str, Any]:
    ms, mm = cal.data.scout_manifest, cal.data.main_manifest
    calibration = samples[cal.part(samples["sample_idx"].to_numpy(), "calibration")]
    return {"pair": pair, "scout": ms["model"], "main": mm["model"], "dataset": ms["dataset"],
            "n_samples": len(samples), "n_calibration_samples": len(calibration), "n_test_samples": len(test),
            "n_calibration_passages": int(calibration["passage"].nunique()),
            "n_test_passages": int(test["passage"].nunique()),
            "layer_map": {"name": cfg.layer_map, "scout_layer_of_main": cal.layer_map},
            "projectors": {k: {f: c[f] for f in ("params", "bytes", "calibration_error", "validation_error", "errors")}
                           for k, c in cards.items()},
            "text_bytes_mean": float(np.mean([text_bytes(c) for c in test["context"]])), "projection": asdict(cfg)}


def _hybrid_fits(cal: Calibration, table: pd.DataFrame, models: tuple[LoadedModel, LoadedModel], prompt: dict[str, Any],
                 cfg: ProjectionSettings, projectors: dict[tuple[str, str], Any], about: dict[str, Any],
                 out_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """What the configured hybrid conditions need fitted (projected_hidden's hidden map, fused's fuser), and the
    fuser's fit time and peak memory."""
    extras, measured = {"hidden": None, "fuser": None}, {}
    if "projected_hidden" in cfg.conditions:
        extras["hidden"] = stage_hidden_map(cal, table, models, prompt, cfg, projectors, about, out_dir)
    if "fused" in cfg.conditions:
        extras["fuser"], measured[f"gated/{OBJECTIVE}"] = stage_fuser(cal, table, models, prompt, cfg, projectors, about,
                                                                       out_dir)
    return extras, measured


def fit_projection(scout_kv: Path, main_kv: Path, samples: Path, scout_model: Path, main_model: Path, pair: str,
                   section: Mapping[str, Any], prompt: dict[str, Any], device: str, dtype: str, out_dir: Path,
                   structure_metrics: Path | None = None) -> None:
    """Fit and score the projectors of one pair on the whole sample table; write them, their metrics, the facts,
    the fit's timings (FIT_TIMINGS) and what the answering chunks need (ANSWERING: answer_chunk) under out_dir.
    section: the pair's validated `projection` section."""
    out_dir, cfg = Path(out_dir), from_section(ProjectionSettings, section)
    passages = read_passages(Path(samples), Path(scout_kv))
    table = pd.read_parquet(samples)
    scout, main = load_model(Path(scout_model), device, dtype), load_model(Path(main_model), device, dtype)
    lmap = layer_map(cfg.layer_map, scout.card["num_layers"], main.card["num_layers"], structure_metrics)
    kinds = tuple(dict.fromkeys(k for name in cfg.projectors for k in kinds_of(name, cfg)))
    cal = Calibration.open(Path(scout_kv), Path(main_kv), passages, pair, lmap, kinds, cfg)
    clock = [time.perf_counter()]
    stats = cal.statistics()
    clock.append(time.perf_counter())
    attention = attention_data(cal, table, scout, main, prompt, cfg) if "attention" in cfg.objectives else None
    distill = distill_data(cal, table, scout, main, prompt, cfg) if "distill" in cfg.objectives else None
    clock.append(time.perf_counter())
    fitted = fit_all(cal, stats, cfg, main, attention, distill, out_dir / "checkpoints")
    del attention, distill   # attention samples hold the main's KV, distill samples its log-probabilities
    clock.append(time.perf_counter())
    about = {"pair": pair, "scout": scout.slug, "main": main.slug,
             "layer_map": {"name": cfg.layer_map, "scout_layer_of_main": lmap}}
    cards = save(fitted, cal, about, out_dir / "projectors")
    write_parquet(projector_metrics(cal, fitted, stats, passages, cfg), out_dir / "projector_metrics.parquet")
    state = {"projectors": {k: f.projector.eval().to(main.device) for k, f in fitted.items()}, "layer_map": lmap,
             "means": main_means(stats, cal)}
    extras, fuser_fit = _hybrid_fits(cal, table, (scout, main), prompt, cfg, state["projectors"], about, out_dir)
    state |= extras   # the hidden map and the fuser, None where not configured
    test = table[cal.part(table["sample_idx"].to_numpy(), "test")].sort_values("sample_idx")
    test = test.iloc[whole_passages(test["passage"].to_numpy(), cfg.max_test_samples)]
    state["test"] = test["sample_idx"].tolist()
    buffer = io.BytesIO()   # torch.save names its zip records after a file's name: a buffer's are the same every run
    torch.save(state, buffer)
    with atomic_path(out_dir / ANSWERING) as tmp:
        tmp.write_bytes(buffer.getvalue())
    clock.append(time.perf_counter())
    phases = dict(zip(("statistics_s", "attention_data_s", "fit_s", "metrics_s"), np.diff(clock).round(2)))
    fit_s = {f"{n}/{o}": f.fit_s for (n, o), f in fitted.items()} | {k: m["fit_s"] for k, m in fuser_fit.items()}
    peaks = {f"{n}/{o}": f.peak_mib for (n, o), f in fitted.items() if f.peak_mib is not None}
    write_json(out_dir / FIT_TIMINGS, {"phases": phases, "fit_s": fit_s,
                                       "fit_peak_mib": peaks | {k: m["peak_mib"] for k, m in fuser_fit.items()}})
    facts = _facts(pair, cal, cfg, cards, table, test)
    if len(test):
        answerer = Answerer(scout, main, state, cfg, prompt, pair)
        facts["n_template_tokens"] = answerer.prompt_tokens(next(test.itertuples(index=False))).context_start
    write_json(out_dir / "facts.json", facts)


def answer_chunk(answering: Path, chunk: Path, scout_model: Path, main_model: Path, pair: str,
                 section: Mapping[str, Any], prompt: dict[str, Any], device: str, dtype: str, out_dir: Path) -> None:
    """Answer the test samples of a chunk of the sample table with the fitted projectors (the ANSWERING file of
    fit_projection); write its CHUNK_TABLES and its seconds (timings.json) under out_dir. section: as fit_projection's."""
    started, cfg = time.perf_counter(), from_section(ProjectionSettings, section)
    state = torch.load(answering, weights_only=False)   # fit_projection's, each tensor on the device it was fitted on
    order = {idx: i for i, idx in enumerate(state["test"])}   # position among all test samples
    table = pd.read_parquet(chunk)
    test = table[table["sample_idx"].isin(order)].sort_values("sample_idx")
    timed = len(order) if cfg.ttft_samples is None else cfg.ttft_samples
    answers, ttfts, timings = [], [], []
    if len(test):   # a chunk without test samples loads no model
        scout, main = load_model(Path(scout_model), device, dtype), load_model(Path(main_model), device, dtype)
        common = {k: state[k] for k in ("projectors", "layer_map", "means")}
        common["extras"] = {"hidden": (scout, state["hidden"])} if state["hidden"] is not None else {}
        if state["fuser"] is not None:
            common["extras"]["fuser"] = state["fuser"]
        answerer = Answerer(scout, main, common, cfg, prompt, pair)
        if order[test["sample_idx"].iloc[0]] < timed:
            answerer.warm_up(next(test.itertuples(index=False)))
    for row in tqdm(test.itertuples(index=False), total=len(test), desc=f"projection {pair}: answers", unit="sample"):
        records, ttft, timing = answerer.sample(row, ttft=order[row.sample_idx] < timed)
        answers += records
        ttfts += ttft
        timings.append(timing)
    out_dir = Path(out_dir)
    write_parquet(pd.DataFrame(answers), out_dir / "answers.parquet")
    write_parquet(pd.DataFrame(timings), out_dir / "timings.parquet")
    variant = [f.name for f in fields(Variant)]
    parts = ["scout_s", "own_prefill_s", "build_s", "question_s", "bytes"]   # answer.Answerer.ttft's measured parts
    write_parquet(pd.DataFrame(ttfts, columns=["sample_idx", *variant, *parts]), out_dir / "ttft.parquet")
    write_json(out_dir / "timings.json", {"answers_s": round(time.perf_counter() - started, 2)})


def run_projection(scout_kv: Path, main_kv: Path, samples: Path, scout_model: Path, main_model: Path, pair: str,
                   section: Mapping[str, Any], prompt: dict[str, Any], device: str, dtype: str, out_dir: Path,
                   structure_metrics: Path | None = None) -> None:
    """Fit, score, inject and answer for one pair on the whole sample table (one chunk); write every table and the
    projectors under out_dir. section: as fit_projection's."""
    out_dir = Path(out_dir)
    fit_projection(scout_kv, main_kv, samples, scout_model, main_model, pair, section, prompt, device, dtype, out_dir,
                   structure_metrics)
    answer_chunk(out_dir / ANSWERING, samples, scout_model, main_model, pair, section, prompt, device, dtype,
                 out_dir / "chunks" / "all")
    gather([out_dir / "chunks" / "all"], out_dir / FIT_TIMINGS, out_dir)


def compute(inputs: Mapping[str, Path | None], pair: str, params: Mapping[str, Any], out_dir: Path) -> None:
    """The stage's compute step as the workflow and the CLI run it (kvpipe.stages): inputs by name, params from
    kvpipe.config.stage_params."""
    run_projection(inputs["scout_kv"], inputs["main_kv"], inputs["samples"], inputs["scout_dir"], inputs["main_dir"], pair,
                   params["projection"], params["prompt"], params["device"], params["dtype"], out_dir,
                   inputs["structure_metrics"])

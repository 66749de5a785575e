"""Fit every configured projector for each objective, and save each as safetensors plus a JSON card."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvpipe.data.prompt import build_prompt
from kvpipe.io import sha256_json, write_json
from kvpipe.linalg.ridge import pooled
from kvpipe.models.load import LoadedModel
from kvpipe.projection.attention import AttentionSample, collect, fine_tune
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.distill_stage import DistillData, distilled
from kvpipe.projection.projectors import Errors, Projector, Stats, save_tensors
from kvpipe.projection.registry import PROJECTORS
from kvpipe.settings import ProjectionSettings


@dataclass
class Fitted:
    """A fitted projector with its errors and fit time (seconds, reconstruction fit included)."""

    projector: Projector
    errors: Errors
    fit_s: float
    card: dict[str, Any] = field(default_factory=dict)      # extra card fields (distill: curve, tokens seen)
    peak_mib: float | None = None                           # measured: goes to the timing files only


def kinds_of(name: str, cfg: ProjectionSettings) -> tuple[str, ...]:
    """What a projector maps: keys (pre-RoPE) and values; ridge also post-RoPE keys when compared."""
    return ("key", "value", "key_post") if name == "ridge" and cfg.post_rope_comparison else ("key", "value")


def attention_data(cal: Calibration, samples: pd.DataFrame, scout: LoadedModel, main: LoadedModel,
                   prompt: dict[str, Any], cfg: ProjectionSettings) -> tuple[list[AttentionSample], list[AttentionSample]]:
    """Seeded training and held-out attention samples from the training and validation calibration folds."""
    rng = np.random.default_rng(cfg.seed)
    idx = samples["sample_idx"].to_numpy()
    train = rng.permutation(idx[cal.part(idx, "train")])[: cfg.attention.samples]
    held = rng.permutation(idx[cal.part(idx, "validation")])[: cfg.attention.held_out]
    by_idx = samples.set_index("sample_idx")

    def one(i: int) -> AttentionSample:
        row = by_idx.loc[i]
        return collect(scout, main, build_prompt(main.tokenizer, prompt, row["context"], row["question"]))

    return [one(int(i)) for i in sorted(train)], [one(int(i)) for i in sorted(held)]


def fit_all(cal: Calibration, stats: Stats, cfg: ProjectionSettings, main: LoadedModel,
            attention: tuple[list[AttentionSample], list[AttentionSample]] | None,
            distill: DistillData | None = None, checkpoints: Path | None = None) -> dict[tuple[str, str], Fitted]:
    """Every (projector, objective) of the config; attention and distill objectives refine a copy of the
    reconstruction fit (distill checkpoints under `checkpoints`)."""
    p, q = cal.widths
    out = {}
    for name in cfg.projectors:
        started = time.perf_counter()
        projector = PROJECTORS[name](len(cal.layer_map), kinds_of(name, cfg), p, q, cfg)
        errors = projector.fit(cal, stats)
        fit_s = time.perf_counter() - started
        out[(name, "reconstruction")] = Fitted(projector, errors, fit_s)
        if "attention" in cfg.objectives and attention is not None:
            started = time.perf_counter()
            refined = copy.deepcopy(projector)
            losses = fine_tune(refined, *attention, cal.layer_map, main, cfg.attention, cfg.seed)
            out[(name, "attention")] = Fitted(refined, {"attention": losses}, fit_s + time.perf_counter() - started)
        if "distill" in cfg.objectives and distill is not None:
            started = time.perf_counter()
            where = None if checkpoints is None else Path(checkpoints) / f"{name}-distill.pt"
            refined, errors, card, peak = distilled(projector, distill, cal.layer_map, main, cfg, where)
            out[(name, "distill")] = Fitted(refined, errors, fit_s + time.perf_counter() - started, card, peak)
    return {k: v for k, v in out.items() if k[1] in cfg.objectives}


def main_means(stats: Stats, cal: Calibration) -> dict[str, torch.Tensor]:
    """The main's calibration mean per layer of pre-RoPE keys and values: [layers, width]."""
    def mean(j: int, kind: str) -> np.ndarray:
        s = pooled([stats[(j, kind, f)] for f in range(cal.folds)])
        return s.sy / s.n

    return {kind: torch.as_tensor(np.stack([mean(j, kind) for j in range(len(cal.layer_map))]), dtype=torch.float32)
            for kind in ("key", "value")}


def fit_data_hash(cal: Calibration) -> str:
    """Identifies the rows a projector was fitted on: both datasets' shard hashes and the split."""
    return sha256_json({"scout": [s["files"] for s in cal.data.scout_manifest["shards"]],
                        "main": [s["files"] for s in cal.data.main_manifest["shards"]],
                        "calibration": np.flatnonzero(cal.fold_of >= 0).tolist()})


def save(fitted: dict[tuple[str, str], Fitted], cal: Calibration, about: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """projectors/{name}-{objective}.safetensors and .json under out_dir; returns the cards by 'name/objective'."""
    cards = {}
    data_hash = fit_data_hash(cal)
    for (name, objective), f in fitted.items():
        card = about | {"projector": name, "objective": objective, "kinds": list(f.projector.kinds),
                        "fit_data_sha256": data_hash, "errors": f.errors,
                        "calibration_error": float(np.mean([e["calibration"] for e in f.errors.values()])),
                        "validation_error": float(np.mean([e["validation"] for e in f.errors.values()])),
                        "params": f.projector.n_params(), "bytes": f.projector.n_bytes()} | f.card
        base = Path(out_dir) / f"{name}-{objective}"
        save_tensors(f.projector.state_dict(), base.with_suffix(".safetensors"))
        write_json(base.with_suffix(".json"), card)
        cards[f"{name}/{objective}"] = card
    return cards

"""The structural-analysis stage: scout -> main transfer of keys and values, layer by layer.

Reads the two KV datasets of a pair shard by shard (memory bounded by one shard plus a
fixed-size CKA subsample), splits *passages* into calibration and test sets (questions on one
passage share their context rows), and for each kind (post-RoPE keys, pre-RoPE keys, values)
and aligned (scout layer, main layer):

  - fits a ridge map on calibration tokens (α by k-fold CV over calibration passages) and
    scores it on test tokens: per-token cosine, relative Frobenius error, centred R²;
  - scores the baselines the same way: the calibration-mean predictor, a map fitted on
    shuffled token pairings, and the main model paired with itself;
  - per main head as well as for the whole layer;
  - bootstrap CIs over test samples (all figures come from per-sample sums).

Linear CKA (biased and debiased) is computed for every scout layer x main layer on a
seeded token subsample, with delete-half jackknife intervals for the aligned pairs.
Writes metrics.parquet and facts.json; structure/report.py turns them into the summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from kvpipe.errors import KvpipeError
from kvpipe.io import write_json, write_parquet
from kvpipe.splits import split_by_passage
from kvpipe.stats import bootstrap_counts, percentile_ci
from kvpipe.structure.cka_table import TokenSubsample, cka_records
from kvpipe.structure.pair_data import KINDS, PairData, read_passages
from kvpipe.structure.ridge import (
    LinearMap,
    RidgeStats,
    choose_alpha,
    fit_ridge,
    mean_map,
    metrics_from_scores,
    pooled,
    row_scores,
)

PREDICTORS = ("none", "mean", "shuffled", "self")  # 'none' = the fitted scout -> main map
FITTED = ("none", "shuffled", "self")              # the predictors fitted by ridge
METRICS = ("cosine", "rel_error", "r2")


@dataclass(frozen=True)
class _Run:
    """What every step of one pair's analysis shares."""

    data: PairData
    cfg: dict[str, Any]
    aligned: list[tuple[int, int]]
    groups: list[slice]   # column groups scored: the whole main layer, then each main KV head
    fold_of: np.ndarray   # calibration fold per sample_idx, -1 = test
    test_ids: np.ndarray  # sorted test sample ids

    def shards(self, what: str) -> Iterable[int]:
        """The shard indices, with a progress bar on stderr (the rule log)."""
        return tqdm(range(self.data.n_shards), desc=f"structure {self.data.pair}: {what}", unit="shard")


def _prepare(scout_root: Path, main_root: Path, passages: np.ndarray, pair: str, cfg: dict[str, Any]) -> _Run:
    """Open and check the pair's data, align layers and split passages into calibration folds and test."""
    data = PairData.open(scout_root, main_root, pair)
    if len(passages) != data.n_samples:
        raise KvpipeError(f"pair {pair}: {len(passages)} passage ids for {data.n_samples} samples")
    fold_of, test_ids = split_by_passage(passages, cfg["calibration_fraction"], cfg["cv_folds"], cfg["seed"])
    head_dim = data.main_manifest["head_dim"]
    groups = [slice(None)] + [slice(h * head_dim, (h + 1) * head_dim) for h in range(data.main_manifest["num_kv_heads"])]
    return _Run(data, cfg, data.aligned_layers(), groups, fold_of, test_ids)


def _calibrate(run: _Run) -> tuple[dict[tuple, RidgeStats], TokenSubsample]:
    """Pass 1: ridge statistics per (kind, scout layer, main layer, fitted predictor, fold), and the CKA subsample."""
    ms, mm, folds = run.data.scout_manifest, run.data.main_manifest, run.cfg["cv_folds"]
    stats = {(kind, s, m, pred, f): RidgeStats(mm["width"] if pred == "self" else ms["width"], mm["width"])
             for kind in KINDS for s, m in run.aligned for pred in FITTED for f in range(folds)}
    sub = TokenSubsample(run.cfg["cka_tokens"], run.cfg["seed"])
    shuffle_rng = np.random.default_rng(run.cfg["seed"] + 1)
    for shard in run.shards("calibration pass"):
        # every layer, not only the aligned ones: CKA compares them all
        sample_idx, mats = run.data.matrices(shard, sorted(ms["layers"]), sorted(mm["layers"]), run.cfg["segments"])
        sub.offer(sample_idx, mats)
        fold = run.fold_of[sample_idx]
        for f in range(folds):
            rows = fold == f
            if not rows.any():
                continue
            perm = shuffle_rng.permutation(int(rows.sum()))
            for kind in KINDS:
                for s, m in run.aligned:
                    X, Y = mats[("scout", s, kind)][rows], mats[("main", m, kind)][rows]
                    stats[(kind, s, m, "none", f)].add(X, Y)
                    stats[(kind, s, m, "shuffled", f)].add(X, Y[perm])
                    stats[(kind, s, m, "self", f)].add(Y, Y)
    return stats, sub


def _fit_maps(run: _Run, stats: dict[tuple, RidgeStats]) -> tuple[dict[tuple, LinearMap], dict[str, float]]:
    """Every predictor's map on all calibration folds, α chosen by CV over the folds; and the chosen αs."""
    grid = np.asarray(run.cfg["alpha_grid"], dtype=np.float64)
    folds = range(run.cfg["cv_folds"])
    maps, alphas = {}, {}
    for kind in KINDS:
        for s, m in run.aligned:
            for pred in FITTED:
                fold_stats = [stats[(kind, s, m, pred, f)] for f in folds]
                alpha = choose_alpha(fold_stats, grid)
                maps[(kind, s, m, pred)] = fit_ridge(pooled(fold_stats), alpha)
                alphas[f"{kind}/{s}->{m}/{pred}"] = alpha
            maps[(kind, s, m, "mean")] = mean_map(pooled([stats[(kind, s, m, "none", f)] for f in folds]))
    return maps, alphas


def _score_test(run: _Run, maps: dict[tuple, LinearMap]) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: summed row_scores [kind, aligned, predictor, test sample, group, 4] and tokens per test sample."""
    index = {sid: i for i, sid in enumerate(run.test_ids)}
    scores = np.zeros((len(KINDS), len(run.aligned), len(PREDICTORS), len(run.test_ids), len(run.groups), 4))
    tokens = np.zeros(len(run.test_ids))
    scout_ls, main_ls = sorted({s for s, _ in run.aligned}), sorted({m for _, m in run.aligned})
    for shard in run.shards("test pass"):
        sample_idx, mats = run.data.matrices(shard, scout_ls, main_ls, run.cfg["segments"])
        is_test = run.fold_of[sample_idx] == -1
        if not is_test.any():
            continue
        units = np.array([index[i] for i in sample_idx[is_test]])
        np.add.at(tokens, units, 1)
        for k, kind in enumerate(KINDS):
            for a, (s, m) in enumerate(run.aligned):
                X, Y = mats[("scout", s, kind)][is_test], mats[("main", m, kind)][is_test]
                y_ref = maps[(kind, s, m, "mean")].b
                for j, pred in enumerate(PREDICTORS):
                    Y_hat = maps[(kind, s, m, pred)].predict(Y if pred == "self" else X)
                    for unit in np.unique(units):
                        rows = units == unit
                        scores[k, a, j, unit] += row_scores(Y_hat[rows], Y[rows], y_ref, run.groups)
    return scores, tokens


def _record(kind: str, s: int, m: int, head: int, metric: str, value: float, lo: float, hi: float,
            baseline: str) -> dict[str, Any]:
    return {"kind": kind, "scout_layer": s, "main_layer": m, "head": head, "metric": metric, "value": float(value),
            "ci_low": float(lo), "ci_high": float(hi), "baseline": baseline}


def _transfer_records(run: _Run, scores: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
    """Every metric of every predictor and column group, and the map's paired cosine gain over the mean predictor."""
    level, records = run.cfg["ci"], []
    for k, kind in enumerate(KINDS):
        for a, (s, m) in enumerate(run.aligned):
            per_unit = scores[k, a]                       # [pred, unit, group, 4]
            point = metrics_from_scores(per_unit.sum(1), tokens.sum())
            reps = metrics_from_scores(np.einsum("bu,pugs->bpgs", counts, per_unit), (counts @ tokens)[:, None, None])
            for metric in METRICS:
                lo, hi = percentile_ci(reps[metric], level)
                for j, pred in enumerate(PREDICTORS):
                    for g in range(len(run.groups)):
                        records.append(_record(kind, s, m, g - 1, metric, point[metric][j, g], lo[j, g], hi[j, g], pred))
            # paired: how much of the map's cosine the mean predictor already has
            glo, ghi = percentile_ci(reps["cosine"][:, 0, 0] - reps["cosine"][:, 1, 0], level)
            records.append(_record(kind, s, m, -1, "cosine_gain_over_mean",
                                   point["cosine"][0, 0] - point["cosine"][1, 0], glo, ghi, "mean"))
    return records


def _rope_records(run: _Run, scores: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
    """Paired R² differences of the fitted map: post-RoPE keys minus pre-RoPE keys, and minus values."""
    records = []
    for a, (s, m) in enumerate(run.aligned):
        fitted = scores[:, a, 0, :, 0]  # the fitted map on the whole layer: [kind, test sample, 4]
        reps = [metrics_from_scores(counts @ fitted[k], counts @ tokens)["r2"] for k in range(len(KINDS))]
        point = [float(metrics_from_scores(fitted[k].sum(0), tokens.sum())["r2"]) for k in range(len(KINDS))]
        for other in ("key_pre_rope", "value"):
            o = KINDS.index(other)
            lo, hi = percentile_ci(reps[0] - reps[o], run.cfg["ci"])
            records.append(_record(f"key-vs-{other}", s, m, -1, "r2_difference", point[0] - point[o], lo, hi, "none"))
    return records


def _facts(run: _Run, passages: np.ndarray, tokens: np.ndarray, sub: TokenSubsample,
           alphas: dict[str, float]) -> dict[str, Any]:
    """Sizes, split and settings of the run: what the report states beside the figures."""
    ms, mm, cfg = run.data.scout_manifest, run.data.main_manifest, run.cfg
    test = run.fold_of == -1
    return {"pair": run.data.pair, "scout": ms["model"], "main": mm["model"], "n_samples": ms["n_samples"],
            "n_passages": len(np.unique(passages)), "n_calibration_passages": len(np.unique(passages[~test])),
            "n_test_passages": len(np.unique(passages[test])), "n_calibration_samples": int((~test).sum()),
            "n_test_samples": len(run.test_ids), "n_test_tokens": int(tokens.sum()), "cka_tokens": int(len(sub.keys)),
            "segments": cfg["segments"], "aligned_layers": run.aligned, "alphas": alphas, "cv_folds": cfg["cv_folds"],
            "bootstrap": cfg["bootstrap"], "ci": cfg["ci"]}


def analyse_pair(scout_root: Path, main_root: Path, passages: np.ndarray, pair: str,
                 cfg: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tidy metrics table of a pair and a dict of run facts; passages[i] is the passage id of sample i."""
    passages = np.asarray(passages)
    run = _prepare(Path(scout_root), Path(main_root), passages, pair, cfg)
    stats, sub = _calibrate(run)
    maps, alphas = _fit_maps(run, stats)
    scores, tokens = _score_test(run, maps)
    counts = bootstrap_counts(len(run.test_ids), cfg["bootstrap"], cfg["seed"] + 2)
    records = _transfer_records(run, scores, tokens, counts) + _rope_records(run, scores, tokens, counts)
    records += cka_records(sub, sorted(run.data.scout_manifest["layers"]), sorted(run.data.main_manifest["layers"]),
                           set(run.aligned), cfg["ci"], cfg["seed"] + 3)
    table = pd.DataFrame.from_records(records)
    table.insert(0, "pair", pair)
    return table, _facts(run, passages, tokens, sub, alphas)


def run_structure(scout_kv: Path, main_kv: Path, samples: Path, pair: str, cfg: dict[str, Any], out_dir: Path) -> None:
    """Analyse a pair (KV dataset directories, the sample table they come from); write metrics.parquet and facts.json."""
    table, facts = analyse_pair(Path(scout_kv), Path(main_kv), read_passages(Path(samples), Path(scout_kv)), pair, cfg)
    write_json(Path(out_dir) / "facts.json", facts)
    write_parquet(table, Path(out_dir) / "metrics.parquet")

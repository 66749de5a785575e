"""The structural-analysis stage: scout -> main transfer of keys and values, layer by layer.

Reads the two KV datasets of a pair shard by shard (memory bounded by one shard plus a
fixed-size CKA subsample), splits *samples* into calibration and test sets, and for each
kind (post-RoPE keys, pre-RoPE keys, values) and aligned (scout layer, main layer):

  - fits a ridge map on calibration tokens (α by k-fold CV over calibration samples) and
    scores it on test tokens: per-token cosine, relative Frobenius error, centred R²;
  - scores the baselines the same way: the calibration-mean predictor, a map fitted on
    shuffled token pairings, and the main model paired with itself;
  - per main head as well as for the whole layer;
  - bootstrap CIs over test samples (all figures come from per-sample sums).

Linear CKA (biased and debiased) is computed for every scout layer x main layer on a
seeded token subsample, with delete-half jackknife intervals for the aligned pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kvpipe.errors import KvpipeError
from kvpipe.kv import store as kvstore
from kvpipe.stats import bootstrap_counts, percentile_ci
from kvpipe.structure.cka import center_gram, cka_from_grams
from kvpipe.structure.ridge import (
    RidgeStats,
    choose_alpha,
    fit_ridge,
    mean_map,
    metrics_from_scores,
    pooled,
    row_scores,
)

KINDS = kvstore.KINDS
PREDICTORS = ("none", "mean", "shuffled", "self")  # 'none' = the fitted scout -> main map
METRICS = ("cosine", "rel_error", "r2")


@dataclass
class PairData:
    """The two KV datasets of a pair, checked to describe the same samples and tokens."""

    scout: Path
    main: Path
    scout_manifest: dict[str, Any]
    main_manifest: dict[str, Any]

    @classmethod
    def open(cls, scout: Path, main: Path, pair: str) -> PairData:
        ms, mm = kvstore.load_manifest(scout), kvstore.load_manifest(main)
        if ms["key"]["samples_sha256"] != mm["key"]["samples_sha256"]:
            raise KvpipeError(f"pair {pair}: {scout} and {main} were extracted from different sample tables")
        if [s["samples"] for s in ms["shards"]] != [s["samples"] for s in mm["shards"]]:
            raise KvpipeError(f"pair {pair}: scout and main KV datasets are sharded differently (extraction.shard_size)")
        return cls(Path(scout), Path(main), ms, mm)

    @property
    def n_shards(self) -> int:
        return len(self.scout_manifest["shards"])

    def read(self, role: str, layer: int, shard: int) -> Any:
        return kvstore.read_shard(self.scout if role == "scout" else self.main, layer, shard)


def relative_depth(n_scout: int, n_main: int) -> list[tuple[int, int]]:
    """Scout layer i -> main layer round(i (Lm - 1) / (Ls - 1))."""
    if n_scout == 1:
        return [(0, n_main - 1)]
    return [(i, int(round(i * (n_main - 1) / (n_scout - 1)))) for i in range(n_scout)]


def split_samples(n: int, calibration_fraction: float, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: calibration fold (0..folds-1) or -1 for test; and the sorted test sample ids."""
    n_cal = int(round(n * calibration_fraction))
    if n_cal < folds or n - n_cal < 2:
        raise KvpipeError(f"structure.calibration_fraction: {n} samples give {n_cal} calibration and {n - n_cal} test "
                          f"samples; need at least {folds} (structure.cv_folds) and 2")
    order = np.random.default_rng(seed).permutation(n)
    fold = np.full(n, -1)
    fold[order[:n_cal]] = np.arange(n_cal) % folds
    return fold, np.sort(order[n_cal:])


def _check_alignment(a: Any, b: Any, pair: str) -> None:
    for col in ("sample_idx", "position", "token_id"):
        if not a.column(col).equals(b.column(col)):
            raise KvpipeError(f"pair {pair}: scout and main tokens differ ({col}); the models must share a tokenizer "
                              "(token alignment across tokenizers is not implemented)")


class _Subsample:
    """Seeded bottom-k token subsample kept across shards, with rows for every layer and kind."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.samples = np.empty(0, dtype=np.int64)
        self.rows: dict[tuple[str, int, str], np.ndarray] = {}

    def offer(self, sample_idx: np.ndarray, mats: dict[tuple[str, int, str], np.ndarray]) -> None:
        u = self.rng.random(len(sample_idx))
        keys = np.concatenate([self.keys, u])
        best = np.argsort(keys, kind="stable")[: self.size]
        self.keys, self.samples = keys[best], np.concatenate([self.samples, sample_idx])[best]
        for key, new in mats.items():
            old = self.rows.get(key, np.empty((0, new.shape[1])))
            self.rows[key] = np.concatenate([old, new])[best]


def _cka_tables(sub: _Subsample, scout_layers: list[int], main_layers: list[int], aligned: set[tuple[int, int]],
                level: float, seed: int) -> list[dict[str, Any]]:
    """CKA (biased, debiased) for every scout x main layer, with jackknife CIs on aligned pairs.

    The interval is a delete-half jackknife over samples: CKA on 50 random halves of the
    sampled samples, sd of those values as the standard error (for d = n/2 the jackknife
    variance factor (n - d) / d is 1), normal interval clipped to [-1, 1].
    """
    out = []
    units = np.unique(sub.samples)
    rng = np.random.default_rng(seed)
    halves = [np.flatnonzero(np.isin(sub.samples, rng.choice(units, len(units) // 2, replace=False)))
              for _ in range(50)]
    z = {0.9: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    for kind in KINDS:
        raw = {("main", m): sub.rows[("main", m, kind)] @ sub.rows[("main", m, kind)].T for m in main_layers}
        raw.update({("scout", s): sub.rows[("scout", s, kind)] @ sub.rows[("scout", s, kind)].T for s in scout_layers})
        for debiased in (False, True):
            metric = "cka_debiased" if debiased else "cka"
            main_grams = {m: center_gram(raw[("main", m)], debiased) for m in main_layers}
            for s in scout_layers:
                K = center_gram(raw[("scout", s)], debiased)
                for m in main_layers:
                    value = cka_from_grams(K, main_grams[m])
                    lo = hi = np.nan
                    if (s, m) in aligned and len(units) >= 4:
                        reps = [cka_from_grams(center_gram(raw[("scout", s)][np.ix_(h, h)], debiased),
                                               center_gram(raw[("main", m)][np.ix_(h, h)], debiased)) for h in halves]
                        sd = float(np.nanstd(reps))
                        lo, hi = max(value - z * sd, -1.0), min(value + z * sd, 1.0)
                    out.append({"kind": kind, "scout_layer": s, "main_layer": m, "head": -1, "metric": metric,
                                "value": value, "ci_low": lo, "ci_high": hi, "baseline": "none"})
    return out


def analyse_pair(scout_root: Path, main_root: Path, pair: str, cfg: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Compute the tidy metrics table of a pair and a dict of run facts (sizes, alphas)."""
    data = PairData.open(scout_root, main_root, pair)
    ms, mm = data.scout_manifest, data.main_manifest
    aligned = [(s, m) for s, m in relative_depth(ms["num_layers"], mm["num_layers"])
               if s in ms["layers"] and m in mm["layers"]]
    if not aligned:
        raise KvpipeError(f"pair {pair}: no aligned layers were extracted for both models (extraction.layers)")
    scout_layers, main_layers = sorted(ms["layers"]), sorted(mm["layers"])
    folds = cfg["cv_folds"]
    fold_of, test_ids = split_samples(ms["n_samples"], cfg["calibration_fraction"], folds, cfg["seed"])
    segments = cfg["segments"]
    head_dim = mm["head_dim"]
    groups = [slice(None)] + [slice(h * head_dim, (h + 1) * head_dim) for h in range(mm["num_kv_heads"])]
    p, q = ms["width"], mm["width"]
    stats = {(kind, s, m, pred, f): RidgeStats(q if pred == "self" else p, q)
             for kind in KINDS for s, m in aligned for pred in ("none", "shuffled", "self") for f in range(folds)}
    sub = _Subsample(cfg["cka_tokens"], cfg["seed"])
    shuffle_rng = np.random.default_rng(cfg["seed"] + 1)

    def shard_matrices(shard: int, scout_ls: list[int], main_ls: list[int]) -> tuple[np.ndarray, dict]:
        """Sample ids and float64 rows of the analysed segments, per (role, layer, kind), of one shard."""
        tables = {("scout", s): data.read("scout", s, shard) for s in scout_ls}
        tables.update({("main", m): data.read("main", m, shard) for m in main_ls})
        first = tables[("scout", scout_ls[0])]
        _check_alignment(first, tables[("main", main_ls[0])], pair)
        keep = pc.is_in(pc.cast(first.column("segment"), pa.string()), value_set=pa.array(segments, pa.string()))
        mats = {(role, layer, kind): kvstore.matrix(table.filter(keep), kind).astype(np.float64)
                for (role, layer), table in tables.items() for kind in KINDS}
        return first.column("sample_idx").to_numpy()[np.asarray(keep)], mats

    # Pass 1: calibration statistics (and the CKA subsample).
    for shard in range(data.n_shards):
        sample_idx, mats = shard_matrices(shard, scout_layers, main_layers)  # every layer: CKA needs them all
        sub.offer(sample_idx, mats)
        fold = fold_of[sample_idx]
        for f in range(folds):
            rows = fold == f
            if not rows.any():
                continue
            perm = shuffle_rng.permutation(int(rows.sum()))
            for kind in KINDS:
                for s, m in aligned:
                    X, Y = mats[("scout", s, kind)][rows], mats[("main", m, kind)][rows]
                    stats[(kind, s, m, "none", f)].add(X, Y)
                    stats[(kind, s, m, "shuffled", f)].add(X, Y[perm])
                    stats[(kind, s, m, "self", f)].add(Y, Y)

    grid = np.asarray(cfg["alpha_grid"], dtype=np.float64)
    maps, alphas = {}, {}
    for kind in KINDS:
        for s, m in aligned:
            for pred in ("none", "shuffled", "self"):
                fold_stats = [stats[(kind, s, m, pred, f)] for f in range(folds)]
                alpha = choose_alpha(fold_stats, grid)
                maps[(kind, s, m, pred)] = fit_ridge(pooled(fold_stats), alpha)
                alphas[f"{kind}/{s}->{m}/{pred}"] = alpha
            maps[(kind, s, m, "mean")] = mean_map(pooled([stats[(kind, s, m, "none", f)] for f in range(folds)]))

    # Pass 2: per-test-sample scores of every predictor.
    index = {sid: i for i, sid in enumerate(test_ids)}
    scores = np.zeros((len(KINDS), len(aligned), len(PREDICTORS), len(test_ids), len(groups), 4))
    tokens = np.zeros(len(test_ids))
    for shard in range(data.n_shards):
        sample_idx, mats = shard_matrices(shard, sorted({s for s, _ in aligned}), sorted({m for _, m in aligned}))
        is_test = fold_of[sample_idx] == -1
        if not is_test.any():
            continue
        units = np.array([index[i] for i in sample_idx[is_test]])
        np.add.at(tokens, units, 1)
        for k, kind in enumerate(KINDS):
            for a, (s, m) in enumerate(aligned):
                X, Y = mats[("scout", s, kind)][is_test], mats[("main", m, kind)][is_test]
                y_ref = maps[(kind, s, m, "mean")].b
                for j, pred in enumerate(PREDICTORS):
                    Y_hat = maps[(kind, s, m, pred)].predict(Y if pred == "self" else X)
                    for unit in np.unique(units):
                        rows = units == unit
                        scores[k, a, j, unit] += row_scores(Y_hat[rows], Y[rows], y_ref, groups)

    counts = bootstrap_counts(len(test_ids), cfg["bootstrap"], cfg["seed"] + 2)
    level = cfg["ci"]
    records = []
    for k, kind in enumerate(KINDS):
        for a, (s, m) in enumerate(aligned):
            per_unit = scores[k, a]                       # [pred, unit, group, 4]
            point = metrics_from_scores(per_unit.sum(1), tokens.sum())
            reps = metrics_from_scores(np.einsum("bu,pugs->bpgs", counts, per_unit), (counts @ tokens)[:, None, None])
            for metric in METRICS:
                lo, hi = percentile_ci(reps[metric], level)
                for j, pred in enumerate(PREDICTORS):
                    for g in range(len(groups)):
                        records.append({"kind": kind, "scout_layer": s, "main_layer": m, "head": g - 1,
                                        "metric": metric, "value": float(point[metric][j, g]),
                                        "ci_low": float(lo[j, g]), "ci_high": float(hi[j, g]), "baseline": pred})
            # paired: how much of the map's cosine the mean predictor already has
            gain = reps["cosine"][:, 0, 0] - reps["cosine"][:, 1, 0]
            glo, ghi = percentile_ci(gain, level)
            records.append({"kind": kind, "scout_layer": s, "main_layer": m, "head": -1, "metric": "cosine_gain_over_mean",
                            "value": float(point["cosine"][0, 0] - point["cosine"][1, 0]), "ci_low": float(glo),
                            "ci_high": float(ghi), "baseline": "mean"})
    # paired: does RoPE make keys transfer better (post-RoPE keys vs pre-RoPE keys and values)?
    for a, (s, m) in enumerate(aligned):
        def r2_reps(k: int) -> np.ndarray:
            return metrics_from_scores(counts @ scores[k, a, 0, :, 0], counts @ tokens)["r2"]

        def r2_point(k: int) -> float:
            return float(metrics_from_scores(scores[k, a, 0, :, 0].sum(0), tokens.sum())["r2"])

        for other in ("key_pre_rope", "value"):
            o = KINDS.index(other)
            lo, hi = percentile_ci(r2_reps(0) - r2_reps(o), level)
            records.append({"kind": f"key-vs-{other}", "scout_layer": s, "main_layer": m, "head": -1,
                            "metric": "r2_difference", "value": r2_point(0) - r2_point(o), "ci_low": float(lo),
                            "ci_high": float(hi), "baseline": "none"})
    records += _cka_tables(sub, scout_layers, main_layers, set(aligned), level, cfg["seed"] + 3)
    table = pd.DataFrame.from_records(records)
    table.insert(0, "pair", pair)
    facts = {"pair": pair, "scout": ms["model"], "main": mm["model"], "n_samples": ms["n_samples"],
             "n_calibration_samples": int((fold_of >= 0).sum()), "n_test_samples": len(test_ids),
             "n_test_tokens": int(tokens.sum()), "cka_tokens": int(len(sub.keys)), "segments": segments,
             "aligned_layers": aligned, "alphas": alphas, "bootstrap": cfg["bootstrap"], "ci": level}
    return table, facts


def run_structure(scout_root: Path, main_root: Path, pair: str, dataset: str, cfg: dict[str, Any],
                  out_dir: Path) -> pd.DataFrame:
    """Analyse a pair and write metrics.parquet, facts.json, summary.md and figures/ under out_dir."""
    from kvpipe.io import atomic_path, write_json
    from kvpipe.structure.report import summary_markdown, write_figures

    table, facts = analyse_pair(Path(scout_root), Path(main_root), pair, cfg)
    out_dir = Path(out_dir)
    write_figures(table, out_dir / "figures", f"{facts['scout']} → {facts['main']} ({dataset})")
    write_json(out_dir / "facts.json", facts)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(table, facts, dataset))
    with atomic_path(out_dir / "metrics.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    return table

"""Tidy metric records of the structure stage from per-passage test scores and passage bootstrap counts.

Every figure is a function of sums over test passages (pooled row scores [.., 4], per-dimension
scores [.., q, 2], canonical-pair sums [.., top, 5], token counts), so a bootstrap replicate is the
same function of the sums weighted by passage resampling counts [B, passages].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpipe.kv.store import KINDS
from kvpipe.linalg.cca import mean_correlation
from kvpipe.linalg.ridge import metrics_from_scores, r2_per_dim
from kvpipe.stats import bootstrap_pvalue, critical_value, holm, percentile_ci

PREDICTORS = ("none", "mean", "shuffled", "self", "position")  # 'none' = the fitted scout -> main map
FITTED = ("none", "shuffled", "self", "position")              # the predictors fitted by ridge
DIM_PREDICTORS = ("none", "position")                          # also scored per output dimension
METRICS = ("cosine", "rel_error", "r2")
CCA_PAIRINGS = ("none", "shuffled")                            # CCA scored on true and on shuffled test pairings


def record(kind: str, s: int, m: int, head: int, metric: str, value: float, lo: float, hi: float,
           baseline: str) -> dict[str, Any]:
    """One row of metrics.parquet."""
    return {"kind": kind, "scout_layer": s, "main_layer": m, "head": head, "metric": metric, "value": float(value),
            "ci_low": float(lo), "ci_high": float(hi), "baseline": baseline}


def transfer_records(aligned: list[tuple[int, int]], groups: list[slice], scores: np.ndarray, dims: np.ndarray,
                     tokens: np.ndarray, counts: np.ndarray, level: float) -> list[dict[str, Any]]:
    """Every metric of every predictor and column group (pooled and per-dimension R²), and the cosine gain."""
    records = []
    for k, kind in enumerate(KINDS):
        for a, (s, m) in enumerate(aligned):
            per_unit = scores[k, a]                       # [pred, unit, group, 4]
            point = metrics_from_scores(per_unit.sum(1), tokens.sum())
            reps = metrics_from_scores(np.einsum("bu,pugs->bpgs", counts, per_unit), (counts @ tokens)[:, None, None])
            point["r2_per_dim"] = r2_per_dim(dims[k, a].sum(1), groups)       # [dim pred, group]
            reps["r2_per_dim"] = r2_per_dim(np.einsum("bu,pudk->bpdk", counts, dims[k, a]), groups)
            for metric in (*METRICS, "r2_per_dim"):
                lo, hi = percentile_ci(reps[metric], level)
                preds = DIM_PREDICTORS if metric == "r2_per_dim" else PREDICTORS
                for j, pred in enumerate(preds):
                    for g in range(len(groups)):
                        records.append(record(kind, s, m, g - 1, metric, point[metric][j, g], lo[j, g], hi[j, g], pred))
            # paired: how much of the map's cosine the mean predictor already has
            glo, ghi = percentile_ci(reps["cosine"][:, 0, 0] - reps["cosine"][:, 1, 0], level)
            records.append(record(kind, s, m, -1, "cosine_gain_over_mean",
                                  point["cosine"][0, 0] - point["cosine"][1, 0], glo, ghi, "mean"))
    return records


def layer_r2(scores: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled R² of the fitted map on whole layers: point [kind, aligned] and replicates [B, kind, aligned]."""
    fitted = scores[:, :, 0, :, 0]  # [kind, aligned, unit, 4]
    point = metrics_from_scores(fitted.sum(2), tokens.sum())["r2"]
    reps = metrics_from_scores(np.einsum("bu,kaus->bkas", counts, fitted), (counts @ tokens)[:, None, None])["r2"]
    return point, reps


def difference_records(aligned: list[tuple[int, int]], point: np.ndarray, reps: np.ndarray,
                       level: float) -> list[dict[str, Any]]:
    """Paired R² differences per aligned layer (keys minus pre-RoPE keys, keys minus values), with
    bootstrap p-values, Holm-adjusted within each family (one family = one comparison over all layers),
    and the smallest difference the interval could tell from 0 (z × bootstrap SE)."""
    records, z = [], critical_value(level)
    for other in ("key_pre_rope", "value"):
        o, kind = KINDS.index(other), f"key-vs-{other}"
        diff = reps[:, 0] - reps[:, o]                       # [B, aligned]
        lo, hi = percentile_ci(diff, level)
        p = bootstrap_pvalue(diff, point[0] - point[o])
        for a, (s, m) in enumerate(aligned):
            records.append(record(kind, s, m, -1, "r2_difference", point[0, a] - point[o, a], lo[a], hi[a], "none"))
            records.append(record(kind, s, m, -1, "r2_difference_p", p[a], np.nan, np.nan, "none"))
            records.append(record(kind, s, m, -1, "r2_difference_p_holm", holm(p)[a], np.nan, np.nan, "none"))
            records.append(record(kind, s, m, -1, "r2_difference_mde", z * np.nanstd(diff[:, a]), np.nan, np.nan,
                                  "none"))
    return records


def depth_slope_records(aligned: list[tuple[int, int]], n_scout_layers: int, point: np.ndarray, reps: np.ndarray,
                        level: float) -> list[dict[str, Any]]:
    """OLS slope of each kind's R² over relative depth (scout layer / (layers - 1)), with a bootstrap CI."""
    if len(aligned) < 2:
        return []
    depth = np.array([s for s, _ in aligned], dtype=np.float64) / max(n_scout_layers - 1, 1)
    x = (depth - depth.mean()) / np.sum((depth - depth.mean()) ** 2)
    records = []
    for k, kind in enumerate(KINDS):
        lo, hi = percentile_ci(reps[:, k] @ x, level)
        records.append(record(kind, -1, -1, -1, "r2_depth_slope", point[k] @ x, lo, hi, "none"))
    return records


def cca_records(aligned: list[tuple[int, int]], sums: np.ndarray, tokens: np.ndarray, counts: np.ndarray,
                level: float) -> list[dict[str, Any]]:
    """The CCA score (metric `cca`) of each kind and aligned layer, on true test pairings (baseline `none`) and
    on shuffled ones (baseline `shuffled`, the null); sums: [kind, aligned, pairing, passage, top, 5]."""
    records = []
    for k, kind in enumerate(KINDS):
        for a, (s, m) in enumerate(aligned):
            point = mean_correlation(sums[k, a].sum(1), tokens.sum())                      # [pairing]
            reps = mean_correlation(np.einsum("bu,puis->bpis", counts, sums[k, a]), (counts @ tokens)[:, None])
            lo, hi = percentile_ci(reps, level)
            records += [record(kind, s, m, -1, "cca", point[j], lo[j], hi[j], pairing)
                        for j, pairing in enumerate(CCA_PAIRINGS)]
    return records

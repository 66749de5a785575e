"""Per-layer test metrics of every projector: cosine, relative error and centred R² on test passages.

Rows are summed per test passage (kvpipe.linalg.ridge.row_scores, additive), so the bootstrap
over passages resamples sums. R² is centred on the calibration mean, which is also scored as the
baseline projector `mean` (R² exactly 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kvpipe.linalg.ridge import metrics_from_scores, pooled, row_scores
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.fit import Fitted
from kvpipe.projection.projectors import Stats
from kvpipe.settings import ProjectionSettings
from kvpipe.stats import bootstrap_counts, cluster_codes, percentile_ci

WHOLE = [slice(None)]
BOOTSTRAP_SEED = 1   # offset of the test-passage bootstrap's seed from projection.seed


@torch.no_grad()
def _passage_scores(cal: Calibration, fitted: dict[tuple[str, str], Fitted], means: dict[tuple[int, str], np.ndarray],
                    unit_of: np.ndarray, n_units: int) -> tuple[dict[tuple, np.ndarray], np.ndarray]:
    """Summed row_scores per (projector, objective, kind, layer) and test passage; and test rows per passage."""
    scores: dict[tuple, np.ndarray] = {}
    rows = np.zeros(n_units)
    for sample_idx, block in cal.blocks("test", "test metrics"):
        units = unit_of[sample_idx]
        np.add.at(rows, units, 1)
        for (j, kind), (X, Y) in block:
            preds = {("mean", "none"): np.broadcast_to(means[(j, kind)], Y.shape)}
            x = torch.as_tensor(X, dtype=torch.float32)
            preds.update({key: f.projector(j, kind, x).double().numpy() for key, f in fitted.items()
                          if kind in f.projector.kinds})
            for key, y_hat in preds.items():
                acc = scores.setdefault((*key, kind, j), np.zeros((n_units, 4)))
                for u in np.unique(units):
                    acc[u] += row_scores(y_hat[units == u], Y[units == u], means[(j, kind)], WHOLE)[0]
    return scores, rows


def projector_metrics(cal: Calibration, fitted: dict[tuple[str, str], Fitted], stats: Stats, passages: np.ndarray,
                      cfg: ProjectionSettings) -> pd.DataFrame:
    """Tidy table: projector, objective, kind, main_layer, scout_layer, relative_depth, metric, value, ci_low, ci_high."""
    means = {(j, kind): (lambda s: s.sy / s.n)(pooled([stats[(j, kind, f)] for f in range(cal.folds)]))
             for j in range(len(cal.layer_map)) for kind in cal.kinds}
    test = cal.fold_of == -1
    unit_of = np.full(len(passages), -1)
    unit_of[test], n_units = cluster_codes(np.asarray(passages)[test])
    scores, rows = _passage_scores(cal, fitted, means, unit_of, n_units)
    counts = bootstrap_counts(n_units, cfg.bootstrap, cfg.seed + BOOTSTRAP_SEED)
    n_main = len(cal.layer_map)
    records = []
    for (projector, objective, kind, j), acc in sorted(scores.items()):
        point = metrics_from_scores(acc.sum(0), rows.sum())
        reps = metrics_from_scores(counts @ acc, counts @ rows)
        for metric, value in point.items():
            low, high = percentile_ci(reps[metric], cfg.ci)
            records.append({"projector": projector, "objective": objective, "kind": kind, "main_layer": j,
                            "scout_layer": cal.layer_map[j], "relative_depth": j / max(n_main - 1, 1),
                            "metric": metric, "value": float(value), "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame.from_records(records)
